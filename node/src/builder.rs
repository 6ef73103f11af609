//! [`NodeBuilder`]: every knob of a node, with its default.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use peerbus_discovery::{Discovery, Interfaces};
use peerbus_transport::{MeshCa, MeshKey, NodeCert};

use crate::engine::breaker::BreakerConfig;
use crate::error::StartError;
use crate::node::Node;
use crate::store::Durability;

/// The most data lanes [`NodeBuilder::lanes`] allows. With its direct stream (requests and
/// replies written without the writer task), a connection then opens at most 64
/// unidirectional streams towards a peer: the limit of nodes built before that stream
/// existed, so they accept it too.
pub const MAX_LANES: usize = 63;
// Lanes plus the direct stream fit in the 64 streams an older node accepts.
const _: () = assert!(MAX_LANES < 64);

/// How a node proves it belongs to its mesh.
#[derive(Clone, Debug)]
pub(crate) enum MembershipChoice {
    Unset,
    Key(MeshKey),
    KeyFile(PathBuf),
    Ca(MeshCa, NodeCert),
    CaFiles { ca: PathBuf, cert: PathBuf },
    Insecure,
}

/// Configures and starts a [`Node`]. Start with [`Node::builder`].
///
/// ```no_run
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// use peerbus_node::{Node, Interfaces};
/// let node = Node::builder("payments")
///     .mesh("shop")
///     .mesh_key_file("/etc/peerbus/mesh.key")
///     .data_dir("/var/lib/payments/peerbus")
///     .interfaces(Interfaces::All)
///     .start()
///     .await?;
/// # Ok(()) }
/// ```
#[must_use = "a builder does nothing until `start()` is awaited"]
pub struct NodeBuilder {
    pub(crate) service: String,
    pub(crate) mesh: String,
    pub(crate) membership: MembershipChoice,
    /// Keys accepted from peers besides the node's own ([`NodeBuilder::also_accept_mesh_keys`]).
    pub(crate) also_accept: Vec<MeshKey>,
    pub(crate) data_dir: Option<PathBuf>,
    pub(crate) listen: Option<SocketAddr>,
    pub(crate) interfaces: Option<Interfaces>,
    pub(crate) mdns: bool,
    pub(crate) seeds: Vec<SocketAddr>,
    /// DNS names whose addresses are seeds ([`NodeBuilder::dns_seed`]), and how often they
    /// are resolved again.
    pub(crate) dns_seeds: Vec<String>,
    pub(crate) dns_refresh: Duration,
    /// How often the certificate file of [`NodeBuilder::mesh_ca_files`] is read again.
    pub(crate) mesh_cert_check_every: Duration,
    /// The mesh CA's revocation lists ([`NodeBuilder::mesh_crl_file`]).
    pub(crate) mesh_crl: Option<PathBuf>,
    pub(crate) discoveries: Vec<Box<dyn Discovery>>,
    pub(crate) prefetch: u32,
    pub(crate) max_message_size: usize,
    pub(crate) ack_timeout: Duration,
    pub(crate) max_attempts: u32,
    pub(crate) retry_backoff: (Duration, Duration),
    pub(crate) lanes: usize,
    pub(crate) max_protocol_version: u32,
    pub(crate) min_protocol_version: u32,
    pub(crate) shutdown_grace: Duration,
    pub(crate) retired_linger: Duration,
    pub(crate) recovered_hold: Duration,
    pub(crate) max_requests_in_flight: usize,
    pub(crate) serve_concurrency: usize,
    pub(crate) start_traces: bool,
    pub(crate) durability: Option<Durability>,
    pub(crate) max_log_entries: usize,
    pub(crate) max_dead_letters: usize,
    pub(crate) max_log_bytes: usize,
    pub(crate) send_timeout: Duration,
    pub(crate) max_frame_size: usize,
    pub(crate) breaker: BreakerConfig,
    pub(crate) max_in_flight_per_service: usize,
    pub(crate) faults: Option<peerbus_transport::Faults>,
    pub(crate) admin: Option<SocketAddr>,
}

impl std::fmt::Debug for NodeBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeBuilder")
            .field("service", &self.service)
            .field("mesh", &self.mesh)
            .field("data_dir", &self.data_dir)
            .field("listen", &self.listen)
            .finish_non_exhaustive()
    }
}

impl NodeBuilder {
    pub(crate) fn new(service: impl Into<String>) -> Self {
        Self {
            service: service.into(),
            mesh: "default".into(),
            membership: MembershipChoice::Unset,
            also_accept: Vec::new(),
            data_dir: None,
            listen: None,
            interfaces: None,
            mdns: true,
            seeds: Vec::new(),
            dns_seeds: Vec::new(),
            dns_refresh: peerbus_discovery::DNS_REFRESH,
            mesh_cert_check_every: crate::runtime::CERT_CHECK_EVERY,
            mesh_crl: None,
            discoveries: Vec::new(),
            prefetch: 256,
            max_message_size: 4 * 1024 * 1024,
            ack_timeout: Duration::from_secs(30),
            max_attempts: 10,
            retry_backoff: (Duration::from_millis(200), Duration::from_secs(30)),
            lanes: 4,
            max_protocol_version: peerbus_discovery::PROTOCOL_VERSION,
            min_protocol_version: crate::engine::wire::MIN_PROTOCOL_VERSION,
            shutdown_grace: Duration::from_secs(5),
            retired_linger: Duration::from_secs(30),
            recovered_hold: Duration::from_millis(500),
            max_requests_in_flight: 65_536,
            serve_concurrency: 256,
            start_traces: true,
            durability: None,
            max_log_entries: 1_000_000,
            max_dead_letters: 100_000,
            max_log_bytes: 1 << 30,
            send_timeout: Duration::from_secs(5),
            max_frame_size: peerbus_transport::DEFAULT_MAX_FRAME_SIZE,
            breaker: BreakerConfig::default(),
            max_in_flight_per_service: 1024,
            faults: None,
            admin: None,
        }
    }

    /// Mesh name. Nodes only see peers of the same mesh. Default: `default`.
    pub fn mesh(mut self, mesh: impl Into<String>) -> Self {
        self.mesh = mesh.into();
        self
    }

    /// The mesh key every member proves it holds (HMAC over TLS keying material; the key never
    /// crosses the wire). Peers without it are refused before any message moves.
    pub fn mesh_key(mut self, key: MeshKey) -> Self {
        self.membership = MembershipChoice::Key(key);
        self
    }

    /// Also accepts peers that prove one of `keys` instead of this node's own mesh key, while
    /// the mesh key is rotated (see [`Membership::Rotating`](peerbus_transport::Membership)).
    /// Added to the keys of [`NodeBuilder::mesh_key`] or [`NodeBuilder::mesh_key_file`]; at
    /// most [`MAX_MESH_KEYS`](peerbus_transport::MAX_MESH_KEYS) keys in all, or `start()`
    /// fails.
    pub fn also_accept_mesh_keys(mut self, keys: impl IntoIterator<Item = MeshKey>) -> Self {
        self.also_accept.extend(keys);
        self
    }

    /// Reads the mesh key from a file written by `peerbus keygen` (64 hex characters).
    /// During a key rotation the file holds more keys, one per line: the node proves the
    /// first and accepts peers that prove any of them (see `peerbus keygen` and the README's
    /// "Rotating the mesh key"). A missing or malformed file fails `start()`.
    pub fn mesh_key_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.membership = MembershipChoice::KeyFile(path.into());
        self
    }

    /// Membership by a mesh CA: peers must present a certificate signed by `ca`, and this
    /// node presents `cert`, which the CA issued for its node id (so the node needs a
    /// [`data_dir`](NodeBuilder::data_dir) holding that identity, or `start()` fails). Peers
    /// with another CA's certificate, an expired one or a mesh key are refused before any
    /// message moves. See [`CaKey`](peerbus_transport::CaKey) and `peerbus ca`.
    pub fn mesh_ca(mut self, ca: MeshCa, cert: NodeCert) -> Self {
        self.membership = MembershipChoice::Ca(ca, cert);
        self
    }

    /// [`NodeBuilder::mesh_ca`] from files: the CA certificate (`ca.crt` of `peerbus ca new`;
    /// while the CA is replaced, both CAs' certificates one after the other) and this node's
    /// certificate (`peerbus ca issue`). A missing, malformed or expired file, or a
    /// certificate for another node, fails `start()`. The node reads both files again every
    /// minute ([`NodeBuilder::mesh_cert_check_every`]), without a restart: it presents a
    /// renewed certificate from then on, and checks a new CA file's peers anew (closing live
    /// connections to peers it no longer accepts).
    pub fn mesh_ca_files(mut self, ca: impl Into<PathBuf>, cert: impl Into<PathBuf>) -> Self {
        self.membership = MembershipChoice::CaFiles {
            ca: ca.into(),
            cert: cert.into(),
        };
        self
    }

    /// The revocation lists of the CAs of [`NodeBuilder::mesh_ca_files`] (PEM CRLs: `ca.crl`
    /// of `peerbus ca revoke`, or what the CA of an existing PKI publishes): a peer whose
    /// certificate's serial number is on its CA's list is refused. Read again with the other
    /// files ([`NodeBuilder::mesh_cert_check_every`]): a certificate revoked while its node
    /// is connected ends that connection then. A missing or malformed file, or a list no CA
    /// of the CA file signed, fails `start()`; so does this without `mesh_ca_files` (with
    /// [`NodeBuilder::mesh_ca`], give the lists to
    /// [`MeshCa::with_revocation_lists`](peerbus_transport::MeshCa::with_revocation_lists)).
    pub fn mesh_crl_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.mesh_crl = Some(path.into());
        self
    }

    /// How often a node of [`NodeBuilder::mesh_ca_files`] reads its CA and certificate files
    /// again to take a renewed certificate or a new CA file (60 s by default, at least
    /// 100 ms). A file that cannot be read, a certificate that is not valid for this node, or
    /// a CA file that does not accept this node's own certificate is logged and the one in
    /// use stays. [`Node::reload_mesh_files`](crate::Node::reload_mesh_files) reads them at
    /// once.
    pub fn mesh_cert_check_every(mut self, every: Duration) -> Self {
        self.mesh_cert_check_every = every;
        self
    }

    /// Runs without a mesh key: any node that finds this one may exchange messages with it.
    /// Logged as a warning at start. Only for demos and trusted networks.
    pub fn insecure_open_mesh(mut self) -> Self {
        self.membership = MembershipChoice::Insecure;
        self
    }

    /// Directory for the node identity (`node.key`) and, later, its durable log.
    /// Default: none — a fresh identity per start, nothing kept.
    pub fn data_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.data_dir = Some(dir.into());
        self
    }

    /// QUIC listen address. Default: `127.0.0.1:0` when discovery is loopback-only, else
    /// `0.0.0.0:0` (all interfaces, a free port).
    pub fn listen(mut self, addr: SocketAddr) -> Self {
        self.listen = Some(addr);
        self
    }

    /// Interfaces mDNS runs on. Default: [`Interfaces::All`] (non-loopback). Tests and demos
    /// on one machine use [`Interfaces::Loopback`].
    pub fn interfaces(mut self, interfaces: Interfaces) -> Self {
        self.interfaces = Some(interfaces);
        self
    }

    /// Turns mDNS off (use seeds or a custom discovery instead).
    pub fn no_mdns(mut self) -> Self {
        self.mdns = false;
        self
    }

    /// Adds a static seed address (for networks without multicast). The node at the address is
    /// identified by its certificate and must pass the mesh proof.
    pub fn seed(mut self, addr: SocketAddr) -> Self {
        self.seeds.push(addr);
        self
    }

    /// Adds a DNS name (`host:port`, the port the nodes listen on there) whose addresses are
    /// seeds: for a Kubernetes headless service (one record per ready pod, for example
    /// `orders.default.svc.cluster.local:7000`) or any name with a record per node. It is
    /// resolved at start and every [`NodeBuilder::dns_refresh`] (10 s by default); a new
    /// address is dialed like a [`seed`](Self::seed), and one that left the records is no
    /// longer dialed (a live connection to it stays). A name that fails to resolve keeps the
    /// addresses it had. At most 1,024 addresses are tracked over all names. `start` fails
    /// with [`StartError::Discovery`] when a name is not `host:port`. Like seeds, turns
    /// mDNS off unless [`NodeBuilder::interfaces`] is called.
    pub fn dns_seed(mut self, name: impl Into<String>) -> Self {
        self.dns_seeds.push(name.into());
        self
    }

    /// How often DNS seeds ([`NodeBuilder::dns_seed`]) are resolved again (10 s by default,
    /// at least 100 ms): how soon a node that joins the records is dialed.
    pub fn dns_refresh(mut self, every: Duration) -> Self {
        self.dns_refresh = every;
        self
    }

    /// Adds a discovery source (for example `MemoryNetwork::discovery()` in tests). When any is
    /// added, mDNS is only used if [`NodeBuilder::interfaces`] was also called.
    pub fn discovery(mut self, d: impl Discovery) -> Self {
        self.discoveries.push(Box::new(d));
        self
    }

    /// How many unacknowledged deliveries each peer may have outstanding with this node (the
    /// prefetch window). Default 256. Too small limits throughput over high-latency links; too
    /// large lets one slow handler hold many messages that other instances could take.
    pub fn prefetch(mut self, n: u32) -> Self {
        self.prefetch = n.max(1);
        self
    }

    /// Largest frame accepted from a peer. Default 8 MiB. A peer sending a larger frame is
    /// disconnected with `FrameTooLarge`; every node of a mesh should use the same value, and it
    /// must exceed `max_message_size` by at least 64 KiB.
    pub fn max_frame_size(mut self, bytes: usize) -> Self {
        self.max_frame_size = bytes;
        self
    }

    /// Largest payload accepted by `send`/`publish`/`request`. Default 4 MiB; must stay at
    /// least 64 KiB below the frame limit ([`NodeBuilder::max_frame_size`]).
    pub fn max_message_size(mut self, bytes: usize) -> Self {
        self.max_message_size = bytes;
        self
    }

    /// How long a delivered message may stay unacknowledged before it is sent again.
    /// Default 30 s. Set it above your slowest handler, or messages are handled twice.
    ///
    /// A timeout counts as a failed attempt: the message is sent again after the retry
    /// backoff ([`NodeBuilder::retry_backoff`]), so an instance that is alive but
    /// slow is not flooded with copies. When the connection it timed out on closes (the
    /// peer died, or reconnected), that backoff ends and the message goes out at once.
    pub fn ack_timeout(mut self, d: Duration) -> Self {
        self.ack_timeout = d;
        self
    }

    /// Attempts (handler failures and ack timeouts) before a message is dead-lettered. Default 10.
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = n.max(1);
        self
    }

    /// Retry delay: starts at `base`, doubles per attempt up to `max`, ±50 % jitter.
    /// Default 200 ms to 30 s.
    pub fn retry_backoff(mut self, base: Duration, max: Duration) -> Self {
        self.retry_backoff = (base, max.max(base));
        self
    }

    /// Data lanes (unidirectional streams) per connection and direction. Keys hash onto lanes,
    /// so one slow key only delays keys on its lane. Default 4, at most [`MAX_LANES`] (63).
    pub fn lanes(mut self, n: usize) -> Self {
        self.lanes = n.clamp(1, MAX_LANES);
        self
    }

    /// The highest wire protocol version this node speaks. Default (and at most)
    /// [`PROTOCOL_VERSION`](peerbus_discovery::PROTOCOL_VERSION); at least
    /// [`MIN_PROTOCOL_VERSION`](crate::engine::wire::MIN_PROTOCOL_VERSION) (4), checked by
    /// `start()`.
    ///
    /// Nodes negotiate: each pair speaks the highest version both know, so a mesh upgrades one
    /// node at a time and needs no setting. Lower it to hold a node at what an older build
    /// speaks, for example to compare, or to test a mixed mesh before an upgrade.
    pub fn max_protocol_version(mut self, version: u32) -> Self {
        self.max_protocol_version = version;
        self
    }

    /// The lowest wire protocol version this node speaks. Default (and at least)
    /// [`MIN_PROTOCOL_VERSION`](crate::engine::wire::MIN_PROTOCOL_VERSION) (4), at most
    /// `max_protocol_version`, checked by `start()`.
    ///
    /// Raise it to 5 once every node of a mesh runs a build that speaks 5, so that no build of
    /// protocol 4 joins again: such a node is refused with "no protocol in common".
    pub fn min_protocol_version(mut self, version: u32) -> Self {
        self.min_protocol_version = version;
        self
    }

    /// How long `shutdown()` waits for in-flight handlers and acks before closing. Default 5 s.
    pub fn shutdown_grace(mut self, d: Duration) -> Self {
        self.shutdown_grace = d;
        self
    }

    /// How long a connection that lost the tie-break of a simultaneous dial stays open at most
    /// for the requests sent on it before the other connection was chosen (it closes sooner
    /// once neither side waits for a reply on it, and later when a request on it, from either
    /// side, has a later deadline). Default 30 s.
    pub fn retired_linger(mut self, d: Duration) -> Self {
        self.retired_linger = d;
        self
    }

    /// How long the entries a restarted node finds unsettled in its store wait before it
    /// sends them again. Default 500 ms; zero sends them as soon as any instance connects.
    ///
    /// The store does not say which instance each was in flight to when the node stopped (a
    /// crash, or a shutdown whose grace ran out): an instance may have handled one without its
    /// ack getting back. Sent again to that instance, its dedup window drops it and acks it;
    /// sent to another, it is handled twice. Each key goes to one instance chosen among those
    /// connected, so entries sent before the instances the node knew have connected would all
    /// go to the first one. The hold gives discovery and the handshakes that time (on
    /// loopback they take a few ms; allow for what mDNS needs on your network). Later
    /// messages of a held key wait behind it, in order; other keys are not held.
    pub fn recovered_hold(mut self, d: Duration) -> Self {
        self.recovered_hold = d;
        self
    }

    /// Requests of this node waiting for a reply at once. Default 65,536.
    pub fn max_requests_in_flight(mut self, n: usize) -> Self {
        self.max_requests_in_flight = n.max(1);
        self
    }

    /// Requests served concurrently by this node's `serve` handler. Default 256.
    pub fn serve_concurrency(mut self, n: usize) -> Self {
        self.serve_concurrency = n.max(1);
        self
    }

    /// Whether a message sent outside any trace starts a new one. Default `true`: every
    /// message carries a W3C `traceparent` header. With `false`, a message carries one only
    /// when it is sent inside a trace (from the handler of a message that carries one, or
    /// inside [`trace::scope`](crate::trace::scope)) or its caller set the header; the others
    /// carry none, and their handlers run in a span without trace ids. A node that does no
    /// tracing saves the header's making and reading: a few percent of the CPU time of a small
    /// send in `peerbus bench`, and 25 of the 149 bytes a 64-byte message takes on the wire.
    pub fn start_traces(mut self, on: bool) -> Self {
        self.start_traces = on;
        self
    }

    /// How durable `send`/`publish` are when they return. Default: [`Durability::Fsync`] with a
    /// data directory (many concurrent sends share one fsync), [`Durability::Memory`] without
    /// one. See [`Durability`] for exactly what each level can lose.
    pub fn durability(mut self, d: Durability) -> Self {
        self.durability = Some(d);
        self
    }

    /// Most unsettled entries per destination log. Default 1,000,000. When a log is full,
    /// `send` waits up to [`NodeBuilder::send_timeout`] for room, then fails with
    /// [`crate::SendError::Backpressure`].
    pub fn max_log_entries(mut self, n: usize) -> Self {
        self.max_log_entries = n.max(1);
        self
    }

    /// Most unsettled payload bytes across all logs. Default 1 GiB. Same behaviour as
    /// [`NodeBuilder::max_log_entries`] when reached.
    pub fn max_log_bytes(mut self, n: usize) -> Self {
        self.max_log_bytes = n.max(1);
        self
    }

    /// Most dead letters the node keeps. Default 100,000. Past it, the oldest are dropped
    /// (logged at warn, counted in `peerbus_dead_letters_dropped_total`): a consumer that
    /// rejects everything, or messages whose TTL runs out for good, cannot fill the disk.
    pub fn max_dead_letters(mut self, n: usize) -> Self {
        self.max_dead_letters = n.max(1);
        self
    }

    /// How long `send`/`publish` wait for room in a full log. Default 5 s.
    pub fn send_timeout(mut self, d: Duration) -> Self {
        self.send_timeout = d;
        self
    }

    /// The circuit breaker every requested service gets. Default: opens when at least half of
    /// 20 or more requests within 10 s failed (timeout, lost instance, handler error), refuses
    /// for 5 s, then lets one probe through. Too sensitive a breaker refuses a healthy service
    /// after a blip; too lax a one keeps callers waiting on a dead one.
    pub fn circuit_breaker(mut self, cfg: BreakerConfig) -> Self {
        self.breaker = cfg;
        self
    }

    /// The bulkhead: most requests in flight to one service at once; more fail fast with
    /// [`crate::RequestError::Bulkhead`]. Default 1024.
    pub fn max_requests_in_flight_per_service(mut self, n: usize) -> Self {
        self.max_in_flight_per_service = n.max(1);
        self
    }

    /// Routes this node's UDP traffic through a fault injector (loss, delay, duplication,
    /// reordering, partitions, freeze), controlled at run time through the [`Faults`] handle.
    /// For chaos tests; off by default, and without it the normal socket is used.
    ///
    /// [`Faults`]: peerbus_transport::Faults
    pub fn faults(mut self, faults: peerbus_transport::Faults) -> Self {
        self.faults = Some(faults);
        self
    }

    /// Serves the admin HTTP endpoint on `addr`: `/status` (JSON), `/metrics` (Prometheus text),
    /// `/healthz`, `/events` (server-sent events) and the live mesh page at `/`. Default: off.
    ///
    /// Plain HTTP without authentication: use a loopback address (`127.0.0.1:9090`, or
    /// `127.0.0.1:0` for a free port, then read [`Node::admin_addr`]) or a private interface.
    /// An address that cannot be bound fails `start()` with [`StartError::Admin`].
    pub fn admin(mut self, addr: SocketAddr) -> Self {
        self.admin = Some(addr);
        self
    }

    /// Starts the node: loads or creates its identity, binds QUIC, starts discovery.
    pub async fn start(self) -> Result<Node, StartError> {
        crate::runtime::start(self).await
    }

    pub(crate) fn default_listen(&self) -> SocketAddr {
        match (&self.listen, &self.interfaces, self.mdns) {
            (Some(a), _, _) => *a,
            (None, Some(Interfaces::Loopback), _) => (Ipv4Addr::LOCALHOST, 0).into(),
            (None, None, _) if !self.discoveries.is_empty() => (Ipv4Addr::LOCALHOST, 0).into(),
            _ => (Ipv4Addr::UNSPECIFIED, 0).into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A node's lanes stay between 1 and `MAX_LANES`, so that with its direct stream it never
    /// opens more streams towards a peer than a node of an older build accepts (64).
    #[test]
    fn lanes_are_kept_between_one_and_the_most_an_older_peer_accepts() {
        assert_eq!(Node::builder("svc").lanes(0).lanes, 1);
        assert_eq!(Node::builder("svc").lanes(8).lanes, 8);
        assert_eq!(Node::builder("svc").lanes(64).lanes, MAX_LANES);
    }
}
