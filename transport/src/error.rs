//! Errors and connection close codes.

use std::net::SocketAddr;
use std::path::PathBuf;

use thiserror::Error;

use crate::identity::NodeId;

/// Why a connection was closed, carried as the QUIC application close code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum CloseCode {
    /// Closed normally.
    Normal = 0,
    /// The node is shutting down.
    Shutdown = 1,
    /// The peer could not prove it holds the mesh key.
    MeshProofFailed = 2,
    /// A frame did not decode.
    MalformedFrame = 3,
    /// A frame exceeded the maximum frame size.
    FrameTooLarge = 4,
    /// Another connection to the same peer was kept.
    DuplicateConnection = 5,
    /// The peer broke the protocol (unexpected frame, wrong mesh, …).
    ProtocolViolation = 6,
    /// The peer stopped keeping up: it did not read what it was sent (a full outgoing queue)
    /// or did not answer the mesh proof in time. Not a fault of its build: a frozen or
    /// overloaded process. (Builds before this code was added see it as `Unknown`.)
    Unresponsive = 7,
    /// The connection stopped carrying packets while the peer answered a new one: a network
    /// path that went dark and came back, with QUIC still backing off its retransmissions.
    /// The node closes it and connects again at once. Not a fault of either build. (Builds
    /// before this code was added see it as `Unknown`.)
    Stalled = 8,
    /// A code this version does not know.
    Unknown = 0xffff,
}

impl CloseCode {
    /// The code for a number received on the wire.
    pub fn from_u32(c: u32) -> CloseCode {
        match c {
            0 => CloseCode::Normal,
            1 => CloseCode::Shutdown,
            2 => CloseCode::MeshProofFailed,
            3 => CloseCode::MalformedFrame,
            4 => CloseCode::FrameTooLarge,
            5 => CloseCode::DuplicateConnection,
            6 => CloseCode::ProtocolViolation,
            7 => CloseCode::Unresponsive,
            8 => CloseCode::Stalled,
            _ => CloseCode::Unknown,
        }
    }

    /// Every code, in the order of [`CloseCode::index`].
    pub const ALL: [CloseCode; 10] = [
        CloseCode::Normal,
        CloseCode::Shutdown,
        CloseCode::MeshProofFailed,
        CloseCode::MalformedFrame,
        CloseCode::FrameTooLarge,
        CloseCode::DuplicateConnection,
        CloseCode::ProtocolViolation,
        CloseCode::Unresponsive,
        CloseCode::Stalled,
        CloseCode::Unknown,
    ];

    /// This code's position in [`CloseCode::ALL`].
    pub fn index(self) -> usize {
        match self {
            CloseCode::Unknown => Self::ALL.len() - 1,
            known => known as usize,
        }
    }

    /// A stable snake-case name, for metric labels and JSON (`protocol_violation`).
    pub fn name(&self) -> &'static str {
        match self {
            CloseCode::Normal => "normal",
            CloseCode::Shutdown => "shutdown",
            CloseCode::MeshProofFailed => "mesh_proof_failed",
            CloseCode::MalformedFrame => "malformed_frame",
            CloseCode::FrameTooLarge => "frame_too_large",
            CloseCode::DuplicateConnection => "duplicate_connection",
            CloseCode::ProtocolViolation => "protocol_violation",
            CloseCode::Unresponsive => "unresponsive",
            CloseCode::Stalled => "stalled",
            CloseCode::Unknown => "unknown",
        }
    }

    /// The code named `name` ([`CloseCode::name`]), as `Status` and metric labels spell it.
    pub fn from_name(name: &str) -> Option<CloseCode> {
        Self::ALL.into_iter().find(|c| c.name() == name)
    }

    /// Whether a close with this code means the peer broke the protocol or the mesh's rules
    /// (a frame that did not decode or was too large, a violation, a wrong mesh key): never
    /// right between nodes of one build and one mesh key. [`CloseCode::Unresponsive`] and
    /// [`CloseCode::Stalled`] are not: a frozen or overloaded peer, or a network that dropped
    /// packets for a while, is still a correct one.
    pub fn is_protocol_fault(&self) -> bool {
        matches!(
            self,
            CloseCode::MeshProofFailed
                | CloseCode::MalformedFrame
                | CloseCode::FrameTooLarge
                | CloseCode::ProtocolViolation
        )
    }

    /// A short human description.
    pub fn describe(&self) -> &'static str {
        match self {
            CloseCode::Normal => "closed",
            CloseCode::Shutdown => "node shutting down",
            CloseCode::MeshProofFailed => "mesh membership refused",
            CloseCode::MalformedFrame => "malformed frame",
            CloseCode::FrameTooLarge => "frame too large",
            CloseCode::DuplicateConnection => "duplicate connection",
            CloseCode::ProtocolViolation => "protocol violation",
            CloseCode::Unresponsive => "peer unresponsive",
            CloseCode::Stalled => "connection stalled; reconnecting",
            CloseCode::Unknown => "unknown reason",
        }
    }

    /// What to do about a close for `reason`, appended to error messages ("" when there is
    /// nothing to do).
    pub(crate) fn advice(&self, reason: &str) -> &'static str {
        match self {
            CloseCode::MeshProofFailed if crate::ca::says_revoked(reason) => {
                "; the mesh CA revoked that certificate: its node is a member again only with \
                 a new one (`peerbus ca issue`; a running node reads its --mesh-cert file again \
                 every minute)"
            }
            CloseCode::MeshProofFailed => {
                "; every node of a mesh needs the same mesh key file, or a certificate from \
                 the same mesh CA (or all run an open mesh)"
            }
            CloseCode::MalformedFrame | CloseCode::ProtocolViolation => {
                "; check that both nodes run the same peerbus version"
            }
            CloseCode::FrameTooLarge => {
                "; use the same max_frame_size on every node, or send smaller messages"
            }
            _ => "",
        }
    }
}

/// Why a connection ended.
#[derive(Debug, Error, Clone)]
#[non_exhaustive]
pub enum ConnectionError {
    /// The peer closed it.
    #[error("peer closed the connection: {} ({reason}){}", code.describe(), code.advice(reason))]
    ClosedByPeer {
        /// Its close code.
        code: CloseCode,
        /// Its reason text.
        reason: String,
    },
    /// We closed it.
    #[error("connection closed locally: {} ({reason})", code.describe())]
    ClosedLocally {
        /// The close code.
        code: CloseCode,
        /// The reason text.
        reason: String,
    },
    /// The peer stopped answering.
    #[error("peer stopped answering (idle timeout)")]
    TimedOut,
    /// The peer reset the connection (it probably restarted).
    #[error("connection reset by the peer")]
    Reset,
    /// Any other transport failure.
    #[error("transport error: {0}")]
    Transport(String),
}

impl From<quinn::ConnectionError> for ConnectionError {
    fn from(e: quinn::ConnectionError) -> Self {
        match e {
            quinn::ConnectionError::ApplicationClosed(c) => ConnectionError::ClosedByPeer {
                code: CloseCode::from_u32(
                    u32::try_from(c.error_code.into_inner()).unwrap_or(u32::MAX),
                ),
                reason: String::from_utf8_lossy(&c.reason).into_owned(),
            },
            quinn::ConnectionError::LocallyClosed => ConnectionError::ClosedLocally {
                code: CloseCode::Normal,
                reason: "closed".into(),
            },
            quinn::ConnectionError::TimedOut => ConnectionError::TimedOut,
            quinn::ConnectionError::Reset => ConnectionError::Reset,
            other => ConnectionError::Transport(other.to_string()),
        }
    }
}

/// A node id did not parse.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("invalid node id: {0}")]
pub struct IdParseError(pub String);

/// The node identity could not be loaded or created.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// Reading or writing the key file failed.
    #[error("cannot read or create the node key {}: {error} (check the data directory and its permissions)", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error (in the message, not a [`source`](std::error::Error::source)).
        error: std::io::Error,
    },
    /// The key file exists but does not hold an ed25519 PKCS#8 key.
    #[error("{} is not a peerbus node key ({reason}); move it aside to create a new identity", path.display())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Key generation or parsing failed.
    #[error("cannot generate or use the node key: {0}")]
    Key(String),
}

/// A mesh key file could not be read or written.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum MeshKeyError {
    /// The file could not be read or written.
    #[error("mesh key file {}: {error}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error (in the message, not a [`source`](std::error::Error::source)).
        error: std::io::Error,
    },
    /// The file does not hold 64 hex characters.
    #[error("mesh key file {} is malformed: {reason} (create one with `peerbus keygen --out FILE`)", path.display())]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// `write_new` found the file already there.
    #[error("mesh key file {} already exists; not overwriting it", path.display())]
    Exists {
        /// The file.
        path: PathBuf,
    },
}

/// A mesh CA file, CA directory or node certificate could not be read, written or used.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum CaError {
    /// A file could not be read or written.
    #[error("{}: {error}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error (in the message, not a [`source`](std::error::Error::source)).
        error: std::io::Error,
    },
    /// A file or certificate is not what it should be.
    #[error("{what} {reason}")]
    Malformed {
        /// The file (or certificate in it).
        what: String,
        /// What is wrong.
        reason: String,
    },
    /// `CaKey::create` found a file already there.
    #[error("{} already exists; not overwriting it", path.display())]
    Exists {
        /// The file.
        path: PathBuf,
    },
    /// A certificate could not be made.
    #[error("cannot issue a certificate: {0}")]
    Sign(String),
}

/// The endpoint could not be created.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum BindError {
    /// The UDP socket could not bind.
    #[error("cannot bind UDP {addr}: {error} (is the port in use, or the address not local?)")]
    Io {
        /// The address.
        addr: SocketAddr,
        /// The I/O error (in the message, not a [`source`](std::error::Error::source)).
        error: std::io::Error,
    },
    /// TLS setup failed (the identity's key could not make a certificate).
    #[error("TLS setup failed: {0}")]
    Tls(String),
    /// The [`crate::EndpointConfig`] is inconsistent (for example keep-alive not below the
    /// idle timeout).
    #[error("invalid endpoint configuration: {0}")]
    Config(String),
}

/// Dialing a peer failed.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// The peer (or we) refused the connection, for example over the mesh key.
    #[error("peer refused: {} ({reason}){}", code.describe(), code.advice(reason))]
    Refused {
        /// The close code.
        code: CloseCode,
        /// Detail.
        reason: String,
    },
    /// The certificate is for another node than the one discovery announced.
    #[error(
        "wrong peer: expected node {expected}, reached {actual} (the address now belongs to another node)"
    )]
    WrongPeer {
        /// The id we pinned.
        expected: NodeId,
        /// The id the certificate proves.
        actual: NodeId,
    },
    /// Nothing answered at the address.
    #[error("unreachable: {0}")]
    Unreachable(String),
    /// The handshake did not finish in time.
    #[error("handshake timed out (the peer is overloaded or the path drops packets)")]
    TimedOut,
    /// TLS failed.
    #[error("TLS handshake failed: {0}")]
    Tls(String),
    /// The peer offers none of this endpoint's ALPN ids (`EndpointConfig::alpn`): it runs a
    /// build too old or too new to speak with this one.
    #[error(
        "no protocol in common with the peer: it offers none of this node's protocol ids \
         (its build is too old or too new for this one; upgrade one of them)"
    )]
    NoCommonProtocol,
    /// Anything else.
    #[error("{0}")]
    Other(String),
}

/// An incoming connection failed.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum AcceptError {
    /// The dialer failed the mesh proof.
    #[error("refused {addr} (node {claimed}): mesh membership refused ({reason}){}", CloseCode::MeshProofFailed.advice(reason))]
    MeshProofFailed {
        /// Its address.
        addr: SocketAddr,
        /// The id its certificate proves.
        claimed: NodeId,
        /// Why.
        reason: String,
    },
    /// The dialer refused us (for example it holds a mesh key and we run an open mesh), or
    /// closed the connection during the proof.
    #[error("{addr} refused this node: {} ({reason}){}", code.describe(), code.advice(reason))]
    Refused {
        /// Its address.
        addr: SocketAddr,
        /// Its close code.
        code: CloseCode,
        /// Its reason text.
        reason: String,
    },
    /// The handshake or proof exchange failed otherwise.
    #[error("incoming connection from {addr} failed: {reason}")]
    Failed {
        /// Its address.
        addr: SocketAddr,
        /// Why.
        reason: String,
    },
}
