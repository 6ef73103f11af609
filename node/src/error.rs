//! Errors, one enum per operation. Each message says what happened and what
//! to do about it.

use std::time::Duration;

use thiserror::Error;

/// Starting a node failed.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum StartError {
    /// Neither a mesh key nor `insecure_open_mesh()` was configured.
    #[error(
        "no mesh key configured: pass a mesh key (`mesh_key_file`, CLI `--mesh-key-file`, env \
         PEERBUS_MESH_KEY_FILE; create one with `peerbus keygen`), a mesh CA and this node's \
         certificate from it (`mesh_ca_files`, CLI `--mesh-ca` and `--mesh-cert`; see `peerbus \
         ca`) or opt into an open mesh with `insecure_open_mesh()` (CLI `--insecure-open-mesh`)"
    )]
    NoMembership,
    /// The mesh key file could not be read.
    #[error("mesh key: {0}")]
    MeshKey(peerbus_transport::MeshKeyError),
    /// The mesh CA file or the node's certificate could not be read.
    #[error("mesh CA: {0}")]
    MeshCa(peerbus_transport::CaError),
    /// The node identity could not be loaded or created.
    #[error("node identity: {0}")]
    Identity(peerbus_transport::IdentityError),
    /// The QUIC endpoint could not bind.
    #[error("could not listen: {0}")]
    Bind(peerbus_transport::BindError),
    /// Discovery could not start.
    #[error("discovery: {0}")]
    Discovery(peerbus_discovery::DiscoveryError),
    /// The data directory is unusable.
    #[error("data directory {path}: {reason}")]
    DataDir {
        /// The directory.
        path: String,
        /// What went wrong.
        reason: String,
    },
    /// The durable store could not be opened (in use by another process, corrupt, disk full).
    #[error("store: {0}")]
    Store(crate::store::StoreError),
    /// A configuration value is invalid.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The admin HTTP endpoint could not listen.
    #[error(
        "admin endpoint: cannot listen on {addr}: {reason}; choose another address (for \
         example 127.0.0.1:0 for any free port)"
    )]
    Admin {
        /// The address asked for.
        addr: std::net::SocketAddr,
        /// Why it failed.
        reason: String,
    },
}

// Each wrapped error is in the message and not also a `source`: a chain printer (anyhow's
// `{:#}`) would otherwise print it twice (Rust API guidelines, C-GOOD-ERR).
macro_rules! start_error_from {
    ($($variant:ident($inner:ty)),* $(,)?) => {$(
        impl From<$inner> for StartError {
            fn from(e: $inner) -> Self {
                StartError::$variant(e)
            }
        }
    )*};
}
start_error_from!(
    MeshKey(peerbus_transport::MeshKeyError),
    MeshCa(peerbus_transport::CaError),
    Identity(peerbus_transport::IdentityError),
    Bind(peerbus_transport::BindError),
    Discovery(peerbus_discovery::DiscoveryError),
);

/// `send` or `publish` failed; nothing was stored.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum SendError {
    /// The service name or topic is not valid.
    #[error("invalid destination `{destination}`: {reason}")]
    InvalidDestination {
        /// What was given.
        destination: String,
        /// Why it is invalid.
        reason: String,
    },
    /// The payload plus headers exceed the maximum message size.
    #[error(
        "message of {size} bytes exceeds the maximum of {max} bytes; split it or raise \
         `max_message_size`"
    )]
    TooLarge {
        /// Encoded size.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// The local log is full and did not drain within the send deadline.
    #[error(
        "backpressure: the local log for `{destination}` is full ({entries} entries) and did not \
         drain within {waited:?}; consumers are slow or offline"
    )]
    Backpressure {
        /// The destination whose log is full.
        destination: String,
        /// Entries currently held.
        entries: usize,
        /// How long `send` waited.
        waited: Duration,
    },
    /// A [`Node::send_batch`](crate::Node::send_batch) or
    /// [`Node::publish_batch`](crate::Node::publish_batch) is over a batch's limits
    /// ([`MAX_BATCH`](crate::MAX_BATCH) messages, [`MAX_BATCH_BYTES`](crate::MAX_BATCH_BYTES));
    /// nothing of it was stored.
    #[error(
        "batch too large: {messages} messages of {bytes} bytes so far, over the limits of \
         {max_messages} messages and {max_bytes} bytes; split it into smaller batches"
    )]
    BatchTooLarge {
        /// Messages counted when a limit was passed.
        messages: usize,
        /// Bytes (payloads, headers and keys) counted when a limit was passed.
        bytes: usize,
        /// The most messages a batch may hold.
        max_messages: usize,
        /// The most bytes a batch may hold.
        max_bytes: usize,
    },
    /// The local store could not write the message (for example the disk is full); nothing
    /// was stored.
    #[error("could not store the message for `{destination}`: {reason}")]
    Store {
        /// The destination.
        destination: String,
        /// The store's error.
        reason: String,
    },
    /// The node is shutting down or stopped.
    #[error("the node is shut down")]
    Stopped,
}

/// A stored message did not reach a handler.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DeliveryError {
    /// Given up and moved to the dead-letter store (`peerbus dlq list`).
    #[error("dead-lettered: {reason}")]
    DeadLettered {
        /// Why.
        reason: String,
    },
    /// Its subscriber group was unsubscribed before it was delivered.
    #[error("released: {reason}")]
    Released {
        /// Why.
        reason: String,
    },
    /// The node stopped before an acknowledgement arrived; the entry stays in the log (when
    /// durable) and is delivered after the next start.
    #[error("the node stopped before the message was acknowledged")]
    Stopped,
}

/// A request got no reply.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum RequestError {
    /// No connected instance of the service serves requests.
    #[error("no responders: no connected instance of service `{service}` serves requests")]
    NoResponders {
        /// The service.
        service: String,
    },
    /// The deadline passed.
    #[error("request to `{service}` timed out after {after:?}")]
    Timeout {
        /// The service.
        service: String,
        /// The deadline that passed.
        after: Duration,
    },
    /// The responder's handler returned an error.
    #[error("`{service}` answered with an error: {message}")]
    Remote {
        /// The service.
        service: String,
        /// The handler's error text.
        message: String,
    },
    /// The connection to the chosen instance was lost before it replied.
    #[error("the instance of `{service}` handling the request went away before replying")]
    PeerLost {
        /// The service.
        service: String,
    },
    /// The service's circuit breaker is open after too many failures: failing fast.
    #[error(
        "circuit breaker for `{service}` is open after repeated failures; next probe in \
         {retry_after:?}"
    )]
    BreakerOpen {
        /// The service.
        service: String,
        /// When a probe request will be let through.
        retry_after: Duration,
    },
    /// The service's bulkhead is full: too many requests to it are in flight.
    #[error("bulkhead full: {limit} requests to `{service}` are already in flight")]
    Bulkhead {
        /// The service.
        service: String,
        /// The limit.
        limit: usize,
    },
    /// Too many requests are waiting for replies.
    #[error("too many requests in flight ({limit}); wait for some to finish")]
    TooManyInFlight {
        /// The limit.
        limit: usize,
    },
    /// The request could not be sent.
    #[error("invalid request: {0}")]
    Invalid(String),
    /// The node is shutting down or stopped.
    #[error("the node is shut down")]
    Stopped,
}

/// Subscribing failed.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum SubscribeError {
    /// The pattern is not valid.
    #[error("invalid topic pattern `{pattern}`: {reason}")]
    InvalidPattern {
        /// What was given.
        pattern: String,
        /// Why it is invalid.
        reason: String,
    },
    /// The node's service inbox was already taken by an earlier `messages()` call.
    #[error("the service inbox is already taken by an earlier `messages()` call")]
    AlreadyTaken,
    /// Too many subscriptions on this node.
    #[error("too many subscriptions ({limit})")]
    TooMany {
        /// The limit.
        limit: usize,
    },
    /// The node is shutting down or stopped.
    #[error("the node is shut down")]
    Stopped,
}

/// A payload could not be encoded or decoded.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("payload codec: {0}")]
pub struct CodecError(pub String);

/// What a handler returns when it cannot handle a message.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum HandlerError {
    /// Try again later (counts as an attempt; after `max_attempts` the message is dead-lettered).
    #[error("retry: {0}")]
    Retry(String),
    /// Never going to work: dead-letter at once.
    #[error("reject: {0}")]
    Reject(String),
}

impl HandlerError {
    /// A retryable failure.
    pub fn retry(reason: impl std::fmt::Display) -> Self {
        HandlerError::Retry(reason.to_string())
    }

    /// A permanent failure.
    pub fn reject(reason: impl std::fmt::Display) -> Self {
        HandlerError::Reject(reason.to_string())
    }
}

/// A new mesh certificate or CA was refused
/// ([`Node::renew_mesh_certificate`](crate::Node::renew_mesh_certificate),
/// [`Node::renew_mesh_ca`](crate::Node::renew_mesh_ca)); the one in use stays.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("mesh membership not renewed: {0}")]
pub struct RenewError(pub String);

/// An administrative operation (dead letters, status) failed.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum AdminError {
    /// The store reported an error.
    #[error("store: {0}")]
    Store(String),
    /// The node is shutting down or stopped.
    #[error("the node is shut down")]
    Stopped,
    /// No log of that name holds an entry.
    #[error("no log named `{0}` holds an entry (`peerbus status` lists the logs)")]
    NoSuchLog(String),
    /// The node has no mesh files to read again: it was built with a mesh key or a mesh CA
    /// given in memory, or an open mesh.
    #[error(
        "this node has no mesh files to read again (it was started with neither \
         --mesh-key-file nor --mesh-ca and --mesh-cert files)"
    )]
    NoMeshFiles,
}
