//! Messages as users see them: what arrives ([`Message`]) and what is sent
//! ([`Outgoing`]).

use std::fmt;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use peerbus_transport::NodeId;
use serde::{Serialize, de::DeserializeOwned};
use smol_str::SmolStr;

use crate::engine::wire::{Envelope, Kind};
use crate::error::CodecError;

/// Uniquely identifies a message: its origin node, the origin's log and the
/// sequence number within that log. For requests the log is empty and the
/// sequence number is the correlation id.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MessageId {
    /// The node that created the message.
    pub origin: NodeId,
    /// The origin's log (`svc:<service>` or `grp:<group>`).
    pub log: String,
    /// Sequence number within `(origin, log)`.
    pub seq: u64,
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.origin, self.log, self.seq)
    }
}

/// The kind of a message.
pub use crate::engine::wire::Kind as MessageKind;

/// A message received by a handler or subscription. Cloning it is cheap: clones share the
/// envelope (and copy the list of headers if [`Message::headers`] made one).
#[derive(Clone, Debug)]
pub struct Message {
    pub(crate) env: Arc<Envelope>,
    /// The headers as text, made by the first [`Message::headers`] call when the envelope
    /// keeps its `traceparent` as bytes.
    headers: OnceLock<Vec<(String, String)>>,
}

impl Message {
    pub(crate) fn shared(env: Arc<Envelope>) -> Self {
        Self {
            env,
            headers: OnceLock::new(),
        }
    }

    /// The message's id.
    pub fn id(&self) -> MessageId {
        MessageId {
            origin: self.env.origin,
            log: self.env.log.to_string(),
            seq: self.env.seq,
        }
    }

    /// Send, publish or request.
    pub fn kind(&self) -> Kind {
        self.env.kind
    }

    /// The node that sent it.
    pub fn from(&self) -> NodeId {
        self.env.origin
    }

    /// The service (send, request) or topic (publish) it was addressed to.
    pub fn destination(&self) -> &str {
        &self.env.destination
    }

    /// The partition key, if the sender set one.
    pub fn key(&self) -> Option<&str> {
        self.env.key.as_deref()
    }

    /// All headers, in the order the sender added them. A message that carries a
    /// `traceparent` keeps it as bytes; the first call makes the list with its text.
    pub fn headers(&self) -> &[(String, String)] {
        match self.env.headers.text_only() {
            Some(list) => list,
            None => self.headers.get_or_init(|| self.env.headers.to_vec()),
        }
    }

    /// The first header named `name` (case-sensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        if name == crate::trace::TRACEPARENT {
            return self
                .headers()
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str());
        }
        self.env.headers.text(name)
    }

    /// The payload's MIME type, if the sender set one.
    pub fn content_type(&self) -> Option<&str> {
        self.env.content_type.as_deref()
    }

    /// When the sender created the message.
    pub fn created_at(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(self.env.created_at_ms)
    }

    /// The W3C trace context the message carries (its `traceparent`/`tracestate` headers).
    pub fn trace_context(&self) -> Option<crate::trace::TraceContext> {
        crate::trace::of_headers(&self.env.headers)
    }

    /// Delivery attempt, starting at 1.
    pub fn attempt(&self) -> u32 {
        self.env.attempt
    }

    /// Whether this delivery is a retry (an earlier attempt may have reached a handler that
    /// failed, or whose ack was lost).
    pub fn redelivered(&self) -> bool {
        self.env.attempt > 1
    }

    /// The raw payload.
    ///
    /// A payload that arrived from another node is a slice of the buffer its connection read
    /// it into (no copy), so holding it keeps that buffer (up to a few hundred KiB, shared with
    /// the messages read along with it) alive. To keep a small payload long after handling
    /// its message, keep a copy (`Bytes::copy_from_slice`).
    pub fn payload(&self) -> &Bytes {
        &self.env.payload
    }

    /// The payload as UTF-8 text, replacing invalid sequences.
    pub fn payload_text(&self) -> String {
        String::from_utf8_lossy(&self.env.payload).into_owned()
    }

    /// Decodes a payload written by [`Outgoing::encode`] (bincode 2).
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, CodecError> {
        bincode::serde::decode_from_slice(&self.env.payload, bincode::config::standard())
            .map(|(v, _)| v)
            .map_err(|e| CodecError(e.to_string()))
    }

    /// Decodes a JSON payload written by [`Outgoing::json`].
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, CodecError> {
        serde_json::from_slice(&self.env.payload).map_err(|e| CodecError(e.to_string()))
    }
}

/// A message to send, publish or request, with its options.
///
/// Anything that converts into [`bytes::Bytes`] converts into an `Outgoing`:
/// `node.send("inventory", "reserve 3")` works, as does
/// `node.send("inventory", Outgoing::encode(&order)?.key(order.id))`.
#[derive(Clone, Debug, Default)]
pub struct Outgoing {
    pub(crate) payload: Bytes,
    pub(crate) key: Option<SmolStr>,
    pub(crate) headers: Vec<(String, String)>,
    pub(crate) content_type: Option<String>,
    pub(crate) ttl: Option<Duration>,
    pub(crate) deliver_after: Option<Duration>,
}

impl Outgoing {
    /// What counts against the node's maximum message size and against a batch's
    /// [`MAX_BATCH_BYTES`](crate::MAX_BATCH_BYTES): the bytes of the payload, of the headers'
    /// names and values, and of the key.
    pub fn size(&self) -> usize {
        self.payload.len()
            + self
                .headers
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>()
            + self.key.as_ref().map_or(0, SmolStr::len)
    }

    /// A message with raw bytes.
    pub fn new(payload: impl Into<Bytes>) -> Self {
        Self {
            payload: payload.into(),
            ..Self::default()
        }
    }

    /// A message whose payload is `value` encoded with bincode 2 (read it with [`Message::decode`]).
    pub fn encode<T: Serialize>(value: &T) -> Result<Self, CodecError> {
        let bytes = bincode::serde::encode_to_vec(value, bincode::config::standard())
            .map_err(|e| CodecError(e.to_string()))?;
        Ok(Self::new(bytes).content_type("application/x-bincode"))
    }

    /// A message whose payload is `value` as JSON (read it with [`Message::json`]).
    pub fn json<T: Serialize>(value: &T) -> Result<Self, CodecError> {
        let bytes = serde_json::to_vec(value).map_err(|e| CodecError(e.to_string()))?;
        Ok(Self::new(bytes).content_type("application/json"))
    }

    /// Partition key: messages with the same key are handled in order, by one instance at a time.
    /// A key of up to 23 bytes is kept inline: given as a `&str`, it costs no allocation.
    pub fn key(mut self, key: impl AsRef<str>) -> Self {
        self.key = Some(SmolStr::new(key));
        self
    }

    /// Adds a header.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Sets the payload's MIME type.
    pub fn content_type(mut self, ct: impl Into<String>) -> Self {
        self.content_type = Some(ct.into());
        self
    }

    /// Time to live: if no instance has handled the message within `ttl`, it is dead-lettered
    /// with reason `ttl expired`. Default: none (wait forever).
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }

    /// Scheduled delivery: do not deliver before `delay` has passed.
    pub fn deliver_after(mut self, delay: Duration) -> Self {
        self.deliver_after = Some(delay);
        self
    }

    /// Scheduled delivery at a wall-clock time (a time in the past delivers at once).
    pub fn deliver_at(self, at: SystemTime) -> Self {
        let delay = at.duration_since(SystemTime::now()).unwrap_or_default();
        self.deliver_after(delay)
    }

    /// Payload size in bytes.
    pub fn len(&self) -> usize {
        self.payload.len()
    }

    /// Whether the payload is empty.
    pub fn is_empty(&self) -> bool {
        self.payload.is_empty()
    }
}

impl From<Bytes> for Outgoing {
    fn from(b: Bytes) -> Self {
        Outgoing::new(b)
    }
}
impl From<Vec<u8>> for Outgoing {
    fn from(b: Vec<u8>) -> Self {
        Outgoing::new(b)
    }
}
impl From<&'static [u8]> for Outgoing {
    fn from(b: &'static [u8]) -> Self {
        Outgoing::new(b)
    }
}
impl From<&str> for Outgoing {
    fn from(s: &str) -> Self {
        Outgoing::new(Bytes::copy_from_slice(s.as_bytes()))
    }
}
impl From<String> for Outgoing {
    fn from(s: String) -> Self {
        Outgoing::new(s)
    }
}

pub(crate) fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
