//! The peerbus node: embed one in each service.
//!
//! A node finds its peers over mDNS (or seeds), proves it belongs to the mesh,
//! and exchanges messages with them directly over QUIC. Messages for a
//! service or subscriber group wait in the sender's log until an instance has
//! handled them and acknowledged.
//!
//! ```no_run
//! use std::time::Duration;
//! use peerbus_node::{HandlerError, Interfaces, Node};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! // A service that handles messages and answers requests.
//! let inventory = Node::builder("inventory")
//!     .insecure_open_mesh()
//!     .interfaces(Interfaces::Loopback)
//!     .start()
//!     .await?;
//! inventory.serve(|req| async move { Ok(req.payload().clone()) }).await?;
//! let msgs = inventory.messages()?;
//! tokio::spawn(msgs.handle(8, |msg| async move {
//!     println!("reserve {}", msg.payload_text());
//!     Ok::<(), HandlerError>(())
//! }));
//!
//! // Another service sends to it.
//! let shop = Node::builder("shop")
//!     .insecure_open_mesh()
//!     .interfaces(Interfaces::Loopback)
//!     .start()
//!     .await?;
//! let receipt = shop.send("inventory", "sku-42 x3").await?;
//! receipt.acked().await?;
//! let echo = shop.request("inventory", "ping", Duration::from_secs(2)).await?;
//! assert_eq!(&echo[..], b"ping");
//! shop.shutdown().await;
//! inventory.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! Layout: [`engine`] is the sans-IO delivery logic; `runtime` drives it with
//! tokio; this crate root is the public face.

pub mod control;
pub mod engine;
pub mod store;

mod builder;
mod error;
mod message;
mod node;
mod runtime;
mod subscription;

pub use builder::NodeBuilder;
pub use error::{
    AdminError, CodecError, DeliveryError, HandlerError, RequestError, SendError, StartError,
    SubscribeError,
};
pub use message::{Message, MessageId, MessageKind, Outgoing};
pub use node::{Node, PeerInfo, PeerState, Receipt, Request, ServeHandle, Status};
pub use store::{DeadLetter, Durability, StoreError, StoreStats};
pub use subscription::{Delivery, Subscription};

pub use bytes::Bytes;
pub use peerbus_discovery::{
    Discovery, DiscoveryEvent, Interfaces, MdnsDiscovery, MemoryDiscovery, MemoryNetwork,
    PeerRecord, StaticDiscovery,
};
pub use peerbus_transport::{MeshKey, NodeId};
