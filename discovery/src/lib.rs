//! peerbus discovery: how a node learns which peers of its mesh exist and where
//! they listen.
//!
//! A [`Discovery`] is started with the local [`PeerRecord`] and a bounded
//! channel; it announces the record and reports [`DiscoveryEvent`]s about the
//! other members of the same mesh. Four implementations:
//!
//! - [`MdnsDiscovery`]: multicast DNS (RFC 6762/6763) on the chosen
//!   [`Interfaces`]. Service type [`SERVICE_TYPE`], instance name = the node id,
//!   TXT `v` (protocol version), `id` (node id), `svc` (service), `mesh` (mesh).
//! - [`StaticDiscovery`]: a fixed list of seed addresses, reported as
//!   [`DiscoveryEvent::Seed`] (for subnets without multicast).
//! - [`DnsDiscovery`]: DNS names (`host:port`) resolved now and then, each address a
//!   seed, one that is no longer in the records [`DiscoveryEvent::SeedGone`] (Kubernetes
//!   headless services, any name with one record per node).
//! - [`MemoryNetwork`] / [`MemoryDiscovery`]: an in-process "LAN" for tests.
//!
//! Discovery is a hint, never the truth about liveness: a
//! [`DiscoveryEvent::Down`] may come late, never, or for a node that is already
//! back. The QUIC connection decides whether a peer is alive; a node that
//! restarts with the same id is reported [`DiscoveryEvent::Up`] again.
//!
//! ```
//! use peerbus_discovery::{
//!     Discovery, DiscoveryEvent, EVENT_CHANNEL_CAPACITY, MemoryNetwork, NodeId, PeerRecord,
//!     PROTOCOL_VERSION,
//! };
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let record = |byte: u8, port: u16| PeerRecord {
//!     node_id: NodeId::from_bytes([byte; 32]),
//!     service: "orders".into(),
//!     mesh: "demo".into(),
//!     protocol_version: PROTOCOL_VERSION,
//!     addrs: vec![([127, 0, 0, 1], port).into()],
//! };
//! let lan = MemoryNetwork::new();
//! let (tx_a, mut rx_a) = tokio::sync::mpsc::channel(EVENT_CHANNEL_CAPACITY);
//! let (tx_b, _rx_b) = tokio::sync::mpsc::channel(EVENT_CHANNEL_CAPACITY);
//! let mut a = lan.discovery();
//! let mut b = lan.discovery();
//! a.start(record(1, 4001), tx_a)?;
//! b.start(record(2, 4002), tx_b)?;
//! assert_eq!(rx_a.recv().await, Some(DiscoveryEvent::Up(record(2, 4002))));
//! b.stop();
//! assert_eq!(rx_a.recv().await, Some(DiscoveryEvent::Down(NodeId::from_bytes([2; 32]))));
//! # Ok(())
//! # }
//! ```
//!
//! # mDNS on loopback (tests and the demo)
//!
//! [`Interfaces::Loopback`] joins the mDNS group (224.0.0.251:5353) on the IPv4
//! loopback interface only and keeps multicast loop on, so every node on the
//! host sees every other. What the host needs:
//!
//! - In the normal host namespace nothing: Linux routes a datagram sent with
//!   `IP_MULTICAST_IF = 127.0.0.1` over `lo` although `lo` has no `MULTICAST`
//!   flag and no multicast route.
//! - In a fresh namespace (`unshare -n`) only `ip link set lo up`; no
//!   `ip link set lo multicast on` and no `ip route add 224.0.0.0/4 dev lo`.
//!
//! The daemon's sockets are bound to the wildcard `0.0.0.0:5353` and
//! `[::]:5353` (a socket bound to 127.0.0.1 would not receive group-addressed
//! datagrams) with `SO_REUSEPORT`, so several nodes share the port. Packets that
//! arrive on an interface outside the selection are dropped, and nothing is sent
//! on one. Stock mdns-sd 0.21.7 joins the group on *every* interface before a
//! selection can apply, so the kernel sends IGMP/MLD membership reports on them;
//! peerbus builds against a patched copy (`discovery/vendor/mdns-sd`, see its
//! `PEERBUS.md`) that applies the selection first.
#![cfg_attr(docsrs, feature(doc_cfg))]

mod dns;
mod interfaces;
mod mdns;
mod memory;
mod pending;
mod seeds;
mod txt;

use std::net::SocketAddr;

pub use dns::{DNS_REFRESH, DNS_SEED_LIMIT, DnsDiscovery, ResolveFuture, Resolver};
pub use interfaces::{Interfaces, InterfacesParseError};
pub use mdns::{MDNS_PEER_LIMIT, MdnsDiscovery};
pub use memory::{MEMORY_MEMBER_LIMIT, MemoryDiscovery, MemoryNetwork};
pub use peerbus_transport::NodeId;
pub use seeds::StaticDiscovery;

/// The peerbus wire protocol version announced in discovery records (TXT `v`) and in the
/// hello. Nodes of different versions do not connect. Version 2 added the `Retired` control
/// frame (a connection that lost the tie-break is closed only once its requests are answered).
/// Version 3 added `consumes` to the hello and the `Consumes` control frame (a node is an
/// instance of its service for `send` only while it takes its `messages()`). Version 4 gives
/// every durable group a version and gossips released groups as tombstones (`Groups` carries
/// a `GroupState` per group; `GroupGone` is gone), so a node that comes back with a group that
/// was released while it was away no longer teaches it back. Version 5 negotiates versions
/// (a node of this build speaks 5 with a peer that does and 4 with one that speaks only 4, so
/// a mesh upgrades one node at a time) and leaves the origin out of envelopes on the wire (it
/// is the connection's peer). Version 6 lets a requester send a request on a bidirectional
/// stream of its own and read the reply there itself (see `peerbus`'s ARCHITECTURE,
/// "Requests"); the frames are those of version 5. Version 7 lets the requester keep that
/// stream for its next requests, one after another. Version 8 passes the mesh CA's revocation
/// lists from node to node.
pub const PROTOCOL_VERSION: u32 = 8;

/// The DNS-SD service type under which peerbus nodes announce themselves.
pub const SERVICE_TYPE: &str = "_peerbus._udp.local.";

/// The capacity callers are expected to give the event channel passed to
/// [`Discovery::start`]. Any capacity works: implementations wait for space
/// (coalescing per peer meanwhile) and never drop an event.
pub const EVENT_CHANNEL_CAPACITY: usize = 1024;

/// What a node announces about itself, and what discovery reports about peers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerRecord {
    /// The node's identity (its ed25519 public key).
    pub node_id: NodeId,
    /// The service the node belongs to, e.g. `orders`. At most 200 bytes.
    pub service: String,
    /// The mesh name; only peers of the same mesh are reported. At most 200 bytes.
    pub mesh: String,
    /// The highest protocol version the peer speaks ([`PROTOCOL_VERSION`] for this build).
    /// Reported as announced; deciding what to do with another version is the caller's job.
    pub protocol_version: u32,
    /// Where the node's QUIC endpoint listens. mDNS announces one port, that of
    /// the first address, with the IPs of all of them.
    pub addrs: Vec<SocketAddr>,
}

/// What a [`Discovery`] reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DiscoveryEvent {
    /// A peer was found, or its record (addresses) changed. Also sent again when
    /// a peer that went down comes back with the same id.
    Up(PeerRecord),
    /// A peer withdrew its announcement or timed out. A hint only: the QUIC
    /// connection is the truth about liveness, and the peer may already be back.
    Down(NodeId),
    /// An address to dial whose identity is unknown (static seeds, DNS). Re-dialing
    /// with backoff is the node's job.
    Seed(SocketAddr),
    /// A seed reported before is no longer one (its DNS record went): stop dialing it. A
    /// live connection to the node there stays.
    SeedGone(SocketAddr),
}

/// A way of finding the other members of a mesh.
pub trait Discovery: Send + 'static {
    /// Announce `local` and report peers of `local.mesh` (never `local` itself) on `events`
    /// (bounded; the implementation awaits space, never drops). Needs a tokio runtime.
    ///
    /// # Errors
    ///
    /// [`DiscoveryError::AlreadyStarted`] when called twice without
    /// [`stop`](Self::stop), [`DiscoveryError::NoRuntime`] outside a tokio runtime,
    /// [`DiscoveryError::InvalidRecord`] when `local` cannot be announced, and
    /// implementation-specific failures (mDNS daemon, member limit).
    fn start(
        &mut self,
        local: PeerRecord,
        events: tokio::sync::mpsc::Sender<DiscoveryEvent>,
    ) -> Result<(), DiscoveryError>;

    /// Withdraw the announcement (mDNS goodbye) and stop. Idempotent. Events not
    /// yet delivered are discarded. A stopped discovery may be started again.
    fn stop(&mut self);

    /// A short name for logs: `"mdns"`, `"static"`, `"dns"` or `"memory"`.
    fn name(&self) -> &'static str;
}

/// Why a [`Discovery`] could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DiscoveryError {
    /// `start` was called on a discovery that is running.
    #[error("{0} discovery is already started; call stop() before starting it again")]
    AlreadyStarted(&'static str),
    /// `start` was called outside a tokio runtime.
    #[error("discovery needs a tokio runtime: call start() from within one")]
    NoRuntime,
    /// The local record cannot be announced.
    #[error("cannot announce the local record: {0}")]
    InvalidRecord(String),
    /// The mDNS daemon failed.
    #[error(
        "mDNS failed: {0}; check that UDP port 5353 can be bound and the chosen \
         interfaces exist, or use static seeds"
    )]
    Mdns(String),
    /// A DNS seed is not `host:port`.
    #[error("bad DNS seed: {0}")]
    InvalidName(String),
    /// The in-memory network is full.
    #[error("the in-memory network already has {limit} members; stop some before starting more")]
    MemberLimit {
        /// The limit ([`MEMORY_MEMBER_LIMIT`]).
        limit: usize,
    },
}

/// The handle of the current tokio runtime, or [`DiscoveryError::NoRuntime`].
fn runtime() -> Result<tokio::runtime::Handle, DiscoveryError> {
    tokio::runtime::Handle::try_current().map_err(|_| DiscoveryError::NoRuntime)
}
