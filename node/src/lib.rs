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
//! # The delivery promise
//!
//! - `send`/`publish` return once the message is in the sender's log, durable
//!   per [`Durability`] (fsync'd by default with a data directory; concurrent
//!   sends share one fsync). The [`Receipt`] resolves when a consumer's handler
//!   has handled it.
//! - Delivery is at-least-once. A consumer acknowledges only after its handler
//!   returned `Ok` **and** the consumer has durably recorded that it handled
//!   the message (its dedup window, per origin node and log). Unacknowledged
//!   messages are sent again after a reconnect, to another instance when theirs
//!   is gone, and after the ack timeout; the dedup window drops every such
//!   retransmission before it reaches a handler, across consumer restarts too.
//! - Messages with the same key are handled in the order they were sent.
//! - The sending node is a consumer like any other: a node that takes
//!   [`Node::messages`] is an instance of its own service for its own `send`s,
//!   and its durable groups and ephemeral subscriptions get its own
//!   `publish`es, through a local path (no network) with the same log,
//!   retries, dedup window and receipts. A node that never takes
//!   `messages()` is not an instance of its service.
//!
//! ## When a handler can see a message twice
//!
//! Delivery is at-least-once, so a handler must tolerate repeats. They come from
//! an acknowledgement that did not reach the sender, and `peerbus chaos` counts
//! them by cause:
//!
//! - the consumer process **crashed after the handler returned and before the
//!   handled mark was persisted** (a window of one group commit, typically well
//!   under a millisecond plus one fsync);
//! - the **sender** crashed or restarted after the handler ran and before the
//!   ack arrived: it sends the entry again after its restart, possibly to
//!   another instance, whose dedup window never saw it;
//! - the consumer was **frozen or cut off** longer than the sender's ack
//!   timeout: the sender gave the entry to another instance meanwhile.
//!
//! The same instance never runs a message twice while its dedup window holds
//! it (restarts included). A redelivery has [`Message::redelivered`] set
//! (attempt > 1), and it keeps its [`MessageId`].
//!
//! Without a data directory ([`Durability::Memory`]) the dedup window lives in
//! memory only, so a consumer restart forgets it: a message in flight across
//! that restart can reach a handler again.
//!
//! To make a handler idempotent, key its side effect by the message id (or a
//! business id inside the payload): store `id` in the same database
//! transaction as the side effect, and skip the work when the id is already
//! there. Side effects that are naturally idempotent (set a value, upsert)
//! need nothing more.
//!
//! Layout: [`engine`] is the sans-IO delivery logic; `runtime` drives it with
//! tokio; [`store`] is the durable log; this crate root is the public face.

pub mod admin;
pub mod control;
pub mod engine;
pub mod store;
pub mod trace;

mod builder;
mod error;
mod message;
mod node;
mod runtime;
mod subscription;

pub use builder::{MAX_LANES, NodeBuilder};
pub use engine::breaker::{BreakerConfig, BreakerState};
pub use error::{
    AdminError, CodecError, DeliveryError, HandlerError, RenewError, RequestError, SendError,
    StartError, SubscribeError,
};
pub use message::{Message, MessageId, MessageKind, Outgoing};
pub use node::{
    BreakerStatus, DeliveryCounts, MAX_BATCH, MAX_BATCH_BYTES, Node, PeerInfo, PeerState, Receipt,
    Request, RequestOptions, ScatterReply, ServeHandle, Status,
};
pub use runtime::cert::{FileOutcome, MeshReload};
pub use store::{DeadLetter, Durability, StoreError, StoreStats};
pub use subscription::{Delivery, Subscription};

pub use bytes::Bytes;
pub use peerbus_discovery::{
    Discovery, DiscoveryError, DiscoveryEvent, DnsDiscovery, Interfaces, MdnsDiscovery,
    MemoryDiscovery, MemoryNetwork, PROTOCOL_VERSION, PeerRecord, StaticDiscovery,
};
pub use peerbus_transport::{
    CA_CERT_FILE, CA_CRL_FILE, CA_KEY_FILE, CRL_NEXT_UPDATE, CaError, CaKey, CloseCode,
    CloseCounts, FaultConfig, FaultStats, Faults, Identity, MAX_CA_CERTS, MAX_MESH_KEYS,
    MAX_REVOKED, MeshCa, MeshKey, NodeCert, NodeId, RevocationListInfo, SERVICE_URI, Traffic,
    certificate_request, says_revoked,
};
