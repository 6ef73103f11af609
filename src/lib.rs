//! # peerbus
//!
//! A brokerless messaging mesh for microservices. Every service embeds a
//! [`Node`]; nodes find each other over mDNS, talk directly over QUIC, and
//! keep what they send in a log until a consumer has handled it.
//!
//! This crate re-exports [`peerbus_node`]: see [`Node::builder`] to start.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let node = peerbus::Node::builder("payments")
//!     .mesh_key_file("mesh.key")
//!     .start()
//!     .await?;
//! node.send("orders", "order 17 paid").await?.acked().await?;
//! # Ok(()) }
//! ```

pub use peerbus_node::*;
