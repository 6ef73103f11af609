//! The frames two nodes exchange, and the message envelope.
//!
//! Every frame travels as `u32` length prefix + bincode (the codec lives in
//! `peerbus-transport`). The control stream carries [`Control`] frames; data
//! lanes carry [`Data`] frames. Field order is part of the wire format:
//! append new fields at the end of a variant and bump
//! [`PROTOCOL_VERSION`](peerbus_discovery::PROTOCOL_VERSION) when an old peer
//! could not read them.
//!
//! Versions are negotiated, so a mesh upgrades one node at a time. The TLS
//! handshake's ALPN picks the hello: [`ALPN_V4`] connections exchange a
//! [`HelloV4`] and speak protocol 4; [`ALPN_NEGOTIATED`] connections exchange a
//! [`Hello`] naming the range of versions each side speaks and speak the
//! highest both do ([`negotiate`]). A frame whose layout depends on the version
//! is written and read for the connection's [`Dialect`].

use std::sync::Arc;

use bytes::Bytes;
use peerbus_transport::{FrameError, NodeId};
use serde::{Deserialize, Serialize};
use smol_str::SmolStr;

mod decode;
pub(crate) mod encode;
mod headers;

pub use headers::Headers;
pub(crate) use headers::{TraceBytes, traceparent_text};

/// What kind of interaction a message belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Kind {
    /// `send(service, …)`: one instance of the service handles it.
    Send,
    /// `publish(topic, …)`: each subscriber group gets a copy.
    Publish,
    /// `request(service, …)`: one instance answers with a reply.
    Request,
    /// The answer to a request.
    Reply,
}

impl Kind {
    /// Lower-case name used in JSON output: `send`, `publish`, `request`, `reply`.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Send => "send",
            Kind::Publish => "publish",
            Kind::Request => "request",
            Kind::Reply => "reply",
        }
    }
}

/// The envelope of one message as it crosses the wire.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// The node that created the message.
    pub origin: NodeId,
    /// The origin's log the entry lives in (`svc:<service>` or `grp:<group>`); empty for requests.
    pub log: SmolStr,
    /// Sequence number within `(origin, log)`; for requests, the correlation id.
    pub seq: u64,
    /// Send, publish, request or reply.
    pub kind: Kind,
    /// Service name (send, request) or topic (publish).
    pub destination: SmolStr,
    /// Partition key: messages with the same key are handled in order.
    pub key: Option<SmolStr>,
    /// User headers; `traceparent`/`tracestate` ride here too (a `traceparent` of the usual
    /// form kept as bytes: see [`Headers`]).
    pub headers: Headers,
    /// MIME type of the payload, when the sender set one.
    pub content_type: Option<String>,
    /// Milliseconds since the Unix epoch when the message was created.
    pub created_at_ms: u64,
    /// Delivery attempt, starting at 1.
    pub attempt: u32,
    /// The payload bytes.
    pub payload: Bytes,
}

/// A subscription interest a node announces to its peers.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Interest {
    /// Topic pattern (`*` one token, `>` the rest).
    pub pattern: String,
    /// Subscriber group; `None` for an ephemeral subscriber of this node only.
    pub group: Option<String>,
}

/// What a node knows of one durable subscriber group: gossiped in [`Control::Groups`] and
/// stored, so every node converges on the newest state whatever order the news arrives in.
///
/// Of two states of a group the one with the higher `version` wins; on a tie a live state wins
/// over a released one, and two live states take the union of their patterns. A race can
/// therefore leave a group that nobody reads (until it is released again), but never releases
/// one that is subscribed.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupState {
    /// A Lamport counter: raised by every release (`Node::unsubscribe_group`) and by every
    /// subscription to a group held as released. No clocks, so no skew.
    pub version: u64,
    /// The topic patterns the group's members subscribe with (sorted, no duplicates); empty
    /// once the group is released. A released state is kept (a tombstone) so that older news
    /// of the group, from a node that was away, loses to it.
    pub patterns: Vec<String>,
}

impl GroupState {
    /// Whether the group is released (a tombstone).
    pub fn is_released(&self) -> bool {
        self.patterns.is_empty()
    }
}

/// Frames on the control stream (one bidirectional stream per connection).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Control {
    /// First frame in each direction. Boxed (the same bytes on the wire): the largest
    /// variant by far, it sized every control frame queued to a connection's writer, and with
    /// it every delivery queued there.
    Hello(Box<Hello>),
    /// The sender's interests changed; the full new set follows.
    Interests(Vec<Interest>),
    /// Entries of `log` (of the receiver of this frame, as origin) that were handled.
    Ack {
        /// Log name at the origin.
        log: String,
        /// Handled sequence numbers.
        seqs: Vec<u64>,
    },
    /// An entry the handler rejected or could not take now.
    Nack {
        /// Log name at the origin.
        log: String,
        /// The rejected sequence number.
        seq: u64,
        /// Why, for the dead-letter store and logs.
        reason: String,
        /// Dead-letter at once instead of retrying.
        permanent: bool,
    },
    /// The peer is shutting down gracefully; stop sending it new work.
    Goodbye,
    /// Whether the sender now serves requests.
    Serves(bool),
    /// What the sender knows of these durable subscriber groups, released ones included: a
    /// publisher keeps copies for a group even when it never met one of its instances, and
    /// forgets a group (releasing its backlog) when a newer state says it was released. The
    /// full set on a new connection, then each change.
    Groups(Vec<(String, GroupState)>),
    /// Sent on a connection the sender retired (it lost the tie-break to a second connection
    /// between the same two nodes): the sender no longer uses it and has no request waiting
    /// for a reply on it. The side that has sent this and received it closes the connection.
    Retired,
    /// Whether the sender now takes its service's messages (see [`Hello::consumes`]).
    Consumes(bool),
    /// [`Control::Ack`] as protocol 5 sends it ([`Control::ack_runs`]): the handled seqs,
    /// sorted, as runs of consecutive numbers. A flush of acks is mostly one run, so it takes
    /// a few bytes instead of one to nine per seq.
    AckRuns {
        /// Log name at the origin.
        log: String,
        /// Each run as `(gap, len)`: it starts `gap` after the end of the run before (the
        /// first, after 0) and holds `len` seqs. At most [`MAX_ACK_RUN_SEQS`] in all.
        runs: Vec<(u64, u64)>,
    },
    /// Revocation lists (CRLs, DER) of the mesh CA, from protocol
    /// [`REVOCATION_LISTS_VERSION`]: the sender's on a new connection, and each newer list it
    /// takes (from its file or a peer) to every peer. A receiver whose mesh CA signed a list
    /// takes it when it is newer than its own (a higher CRL number) and passes it on, so a
    /// list given to one node reaches the mesh; a list it holds already, or an older one, stops
    /// there. At most [`MAX_CA_CERTS`](peerbus_transport::MAX_CA_CERTS) lists are read.
    Revocations(Vec<Bytes>),
}

/// Most seqs one [`Control::AckRuns`] may stand for: a frame naming more closes the
/// connection. A plain [`Control::Ack`] is bounded by the frame size; runs are not, so this
/// bounds what reading one allocates. Far above the acks of one flush (at most a peer's
/// credits' worth per log).
pub const MAX_ACK_RUN_SEQS: u64 = 1 << 20;

impl Control {
    /// The [`Control::AckRuns`] of these seqs (sorted and deduplicated first: the order of
    /// acks carries no meaning).
    pub fn ack_runs(log: String, mut seqs: Vec<u64>) -> Control {
        seqs.sort_unstable();
        seqs.dedup();
        let mut runs = Vec::new();
        let mut end = 0u64;
        let mut seqs = seqs.into_iter().peekable();
        while let Some(start) = seqs.next() {
            let mut len = 1u64;
            while seqs.next_if_eq(&start.wrapping_add(len)).is_some() {
                len += 1;
            }
            runs.push((start.wrapping_sub(end), len));
            end = start.wrapping_add(len);
        }
        Control::AckRuns { log, runs }
    }

    /// The seqs of [`Control::AckRuns`]' `runs`, ascending; `None` when they are more than
    /// [`MAX_ACK_RUN_SEQS`] (checked before anything is allocated).
    pub fn expand_runs(runs: &[(u64, u64)]) -> Option<Vec<u64>> {
        let total = runs
            .iter()
            .try_fold(0u64, |sum, (_, len)| sum.checked_add(*len))?;
        if total > MAX_ACK_RUN_SEQS {
            return None;
        }
        let mut seqs = Vec::with_capacity(usize::try_from(total).ok()?);
        let mut end = 0u64;
        for (gap, len) in runs {
            let start = end.wrapping_add(*gap);
            seqs.extend((0..*len).map(|i| start.wrapping_add(i)));
            end = start.wrapping_add(*len);
        }
        Some(seqs)
    }
}

/// ALPN id of protocol 4 connections: they open with [`ControlV4::Hello`] and their envelopes
/// name their origin. Every build so far offers it, so a node of this build and one of an
/// older build still connect.
pub const ALPN_V4: &[u8] = b"peerbus/1";
/// ALPN id of connections that negotiate their protocol version in the [`Hello`] (protocol 5
/// and later). Preferred over [`ALPN_V4`] when both sides offer it.
pub const ALPN_NEGOTIATED: &[u8] = b"peerbus/2";
/// The lowest protocol version this build speaks: 4, with a peer that offers only [`ALPN_V4`].
pub const MIN_PROTOCOL_VERSION: u32 = 4;
/// The first version spoken on [`ALPN_NEGOTIATED`] connections.
pub const FIRST_NEGOTIATED_VERSION: u32 = 5;
/// The first version whose nodes accept request streams: a bidirectional stream a requester
/// opens for one request (a [`Data::Request`] frame, then the end of its side), on which the
/// server may write the [`Data::Reply`] (then the end of its side). A server that answers
/// later, or through its writer, replies on its direct stream or a lane as before, and just
/// ends its side of the request stream.
pub const REQUEST_STREAMS_VERSION: u32 = 6;
/// The first version whose nodes serve more than one request on a request stream: after
/// reading a [`Data::Reply`] there, the requester may write its next [`Data::Request`] on the
/// same stream instead of ending it, and the server serves the stream's requests one after
/// another until the requester ends it (then ends its own side). Such a server ends the
/// stream without a reply only when it gives up on it.
pub const REQUEST_STREAM_REUSE_VERSION: u32 = 7;
/// The first version whose nodes pass the mesh CA's revocation lists on
/// ([`Control::Revocations`]).
pub const REVOCATION_LISTS_VERSION: u32 = 8;

/// The version two nodes speak on an [`ALPN_NEGOTIATED`] connection: the highest in both
/// ranges (each is `min_version..=version` of a [`Hello`]), or an error naming both ranges
/// when they do not meet.
pub fn negotiate(
    ours: std::ops::RangeInclusive<u32>,
    theirs: std::ops::RangeInclusive<u32>,
) -> Result<u32, String> {
    let version = (*ours.end()).min(*theirs.end());
    if version < *ours.start() || version < *theirs.start() || version < FIRST_NEGOTIATED_VERSION {
        return Err(format!(
            "no protocol version in common: this node speaks {}..={}, the peer {}..={}",
            ours.start(),
            ours.end(),
            theirs.start(),
            theirs.end()
        ));
    }
    Ok(version)
}

/// How the envelopes of [`Data`] frames travel on one connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dialect {
    /// Protocol 4: each envelope names its origin. The receiver checks it is the peer.
    WithOrigin,
    /// Protocol 5 and later: envelopes leave their origin out. It is the peer the connection
    /// proved, so it costs no bytes (32 a message before) and cannot be forged. A
    /// `traceparent` header in its usual form travels as 25 bytes instead of 55 characters
    /// (68 bytes with its name), and reads back as the same text. A delivery's `floor` and
    /// `key_floor` travel as their distance below the entry's seq (wrapping), which takes a
    /// byte or two where the seqs themselves take up to nine.
    PeerOrigin,
}

impl Dialect {
    /// The dialect of a protocol version.
    pub fn of(version: u32) -> Dialect {
        if version >= FIRST_NEGOTIATED_VERSION {
            Dialect::PeerOrigin
        } else {
            Dialect::WithOrigin
        }
    }
}

/// The first frame of a protocol 4 control stream ([`ALPN_V4`]): the same bytes as
/// [`Control::Hello`] of a protocol 4 build. Every later frame is a [`Control`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ControlV4 {
    /// The hello.
    Hello(HelloV4),
}

/// The hello of protocol 4: [`Hello`] without `min_version`, with `version` 4.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelloV4 {
    /// Always 4.
    pub version: u32,
    /// See [`Hello::node_id`].
    pub node_id: NodeId,
    /// See [`Hello::service`].
    pub service: String,
    /// See [`Hello::mesh`].
    pub mesh: String,
    /// See [`Hello::interests`].
    pub interests: Vec<Interest>,
    /// See [`Hello::serves`].
    pub serves: bool,
    /// See [`Hello::credits`].
    pub credits: u32,
    /// See [`Hello::incarnation`].
    pub incarnation: u64,
    /// See [`Hello::consumes`].
    pub consumes: bool,
}

impl From<HelloV4> for Hello {
    fn from(h: HelloV4) -> Hello {
        Hello {
            version: h.version,
            node_id: h.node_id,
            service: h.service,
            mesh: h.mesh,
            interests: h.interests,
            serves: h.serves,
            credits: h.credits,
            incarnation: h.incarnation,
            consumes: h.consumes,
            min_version: h.version,
        }
    }
}

impl Hello {
    /// This hello as a protocol 4 peer reads it (version 4).
    pub fn to_v4(&self) -> HelloV4 {
        HelloV4 {
            version: MIN_PROTOCOL_VERSION,
            node_id: self.node_id,
            service: self.service.clone(),
            mesh: self.mesh.clone(),
            interests: self.interests.clone(),
            serves: self.serves,
            credits: self.credits,
            incarnation: self.incarnation,
            consumes: self.consumes,
        }
    }
}

/// The opening frame of a connection, in both directions.
///
/// On [`ALPN_NEGOTIATED`] connections its layout never changes (a later version that needs
/// more from the hello sends it in a frame of its own), so every build of protocol 5 or later
/// reads every later build's hello and can tell which versions they share.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// The highest protocol version the sender speaks.
    pub version: u32,
    /// Sender's node id (must equal the id proven by TLS).
    pub node_id: NodeId,
    /// Sender's service name.
    pub service: String,
    /// Sender's mesh name.
    pub mesh: String,
    /// Topic interests of the sender.
    pub interests: Vec<Interest>,
    /// Whether the sender serves requests.
    pub serves: bool,
    /// How many unacknowledged deliveries the sender accepts from this peer.
    pub credits: u32,
    /// Random per process start: a different value means the peer restarted.
    pub incarnation: u64,
    /// Whether the sender takes its service's messages (`messages()` is taken and alive): only
    /// then is it an instance that `send`s to its service go to.
    pub consumes: bool,
    /// The lowest protocol version the sender speaks.
    pub min_version: u32,
}

/// Frames on data lanes (unidirectional streams).
// A request holds its envelope inline (some 240 bytes, the others under 50): a frame is
// moved a few times, from its caller to a writer, and a box would cost an allocation per
// request each side.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Data {
    /// A log entry to hand to a handler.
    Deliver {
        /// Every seq below this in `(origin, log)` is settled at the origin: the dedup window may
        /// forget them.
        floor: u64,
        /// Lowest unsettled seq with the same key at the origin when this was sent.
        key_floor: Option<u64>,
        /// The message (shared with the sender's log entry; on the wire, just the envelope).
        env: Arc<Envelope>,
    },
    /// A request; `env.seq` is the correlation id.
    Request {
        /// Milliseconds the responder has left when the frame was sent.
        budget_ms: u64,
        /// The request. Behind a pointer, as a delivery's: inline, it made every frame
        /// (and every queued [`Transmit`](crate::engine::outbox::Transmit) and writer
        /// message) 248 bytes where a delivery needs 40, and each move of one copied them all.
        env: Arc<Envelope>,
    },
    /// The answer to a request.
    Reply {
        /// Correlation id of the request.
        corr: u64,
        /// The reply payload, or the handler's error text.
        result: Result<Bytes, String>,
    },
}

impl Data {
    /// Decodes a data frame's body as received by
    /// [`FrameReceiver::recv_shared`](peerbus_transport::FrameReceiver::recv_shared): the same
    /// bytes [`Data`]'s `Deserialize` reads, with the same outcome, but payloads stay slices of
    /// `body` instead of copies, and a delivered envelope goes straight into its `Arc`.
    ///
    /// A hand-written reader of bincode's layout (`engine/wire/decode.rs`): it was a tenth of a send's
    /// CPU time through serde's generic path. Proptests hold it to serde's answer on valid,
    /// corrupted and random bodies.
    pub fn decode_shared(body: Bytes) -> Result<Self, FrameError> {
        decode::data(body, None)
    }

    /// [`Data::decode_shared`] for a connection of `dialect` to `peer`: with
    /// [`Dialect::PeerOrigin`] the envelopes on the wire leave their origin out, and it is
    /// `peer`.
    pub fn decode_from(body: Bytes, dialect: Dialect, peer: NodeId) -> Result<Self, FrameError> {
        match dialect {
            Dialect::WithOrigin => decode::data(body, None),
            Dialect::PeerOrigin => decode::data(body, Some(peer)),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::trace::TRACEPARENT;
    use peerbus_transport::{decode_frame, encode_frame};
    use proptest::prelude::*;

    fn node(b: u8) -> NodeId {
        NodeId::from_bytes([b; 32])
    }

    /// Any envelope (also used by the store's side-log tests).
    pub(crate) fn env_strategy() -> impl Strategy<Value = Envelope> {
        (
            any::<u8>(),
            ".{0,12}",
            any::<u64>(),
            prop_oneof![
                Just(Kind::Send),
                Just(Kind::Publish),
                Just(Kind::Request),
                Just(Kind::Reply)
            ],
            ".{0,20}",
            proptest::option::of(".{0,8}"),
            proptest::collection::vec((".{0,5}", ".{0,5}"), 0..3),
            any::<u64>(),
            any::<u32>(),
            proptest::collection::vec(any::<u8>(), 0..256),
        )
            .prop_map(
                |(o, log, seq, kind, destination, key, headers, created, attempt, p)| Envelope {
                    origin: node(o),
                    log: log.into(),
                    seq,
                    kind,
                    destination: destination.into(),
                    key: key.map(Into::into),
                    headers: headers.into(),
                    content_type: None,
                    created_at_ms: created,
                    attempt,
                    payload: Bytes::from(p),
                },
            )
    }

    fn roundtrip<T: Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug>(v: T) {
        let mut out = Vec::new();
        encode_frame(&v, &mut out, 1 << 20).expect("encode");
        let (back, used) = decode_frame::<T>(&out, 1 << 20)
            .expect("decode")
            .expect("complete");
        assert_eq!(used, out.len());
        assert_eq!(back, v);
    }

    /// A data frame round trip through [`Data::decode_shared`], which must agree with serde.
    fn roundtrip_shared(v: Data) {
        let mut out = Vec::new();
        encode_frame(&v, &mut out, 1 << 20).expect("encode");
        let body = Bytes::from(out).slice(4..);
        let back = Data::decode_shared(body.clone()).expect("decode");
        assert_eq!(back, v);
        let payload = match &back {
            Data::Deliver { env, .. } => env.payload.clone(),
            Data::Request { env, .. } => env.payload.clone(),
            Data::Reply { result, .. } => result.clone().unwrap_or_default(),
        };
        if !payload.is_empty() {
            assert!(
                body.as_ptr_range().contains(&payload.as_ptr()),
                "the payload is a slice of the frame, not a copy"
            );
        }
    }

    /// [`Data::encode_body`] writes the bytes serde writes, and so do [`Data::encode_head`]
    /// followed by [`Data::payload`] (how the connection writer sends a large payload).
    fn encoders_agree(frame: &Data) -> Result<(), TestCaseError> {
        let mut serde = Vec::new();
        encode_frame(frame, &mut serde, usize::MAX).expect("encode");
        let mut hand = Vec::new();
        frame.encode_body(&mut hand);
        prop_assert_eq!(&serde[4..], &hand[..]);
        let mut head = Vec::new();
        let payload = frame.encode_head(&mut head);
        prop_assert_eq!(payload, frame.payload());
        head.extend_from_slice(payload);
        prop_assert_eq!(&serde[4..], &head[..]);
        Ok(())
    }

    /// [`Dialect::PeerOrigin`] writes serde's bytes without the envelope's origin and with a
    /// `traceparent` of the usual form as 25 bytes (plus one byte saying where it was), and
    /// reads them back exactly, with the peer as the origin.
    fn dialects_agree(frame: &Data) -> Result<(), TestCaseError> {
        let mut full = Vec::new();
        frame.encode_body(&mut full);
        let mut compact = Vec::new();
        let payload = frame.encode_head_in(&mut compact, Dialect::PeerOrigin);
        compact.extend_from_slice(payload);
        let peer = node(200);
        let back = Data::decode_from(Bytes::from(compact.clone()), Dialect::PeerOrigin, peer)
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        let mut expected = frame.clone();
        let env = match &mut expected {
            Data::Deliver { env, .. } => Some(Arc::make_mut(env)),
            Data::Request { env, .. } => Some(Arc::make_mut(env)),
            Data::Reply { .. } => None,
        };
        // A delivery's floors as distances below its seq.
        let varint_len = |v: u64| {
            let mut b = Vec::new();
            encode::varint(&mut b, v);
            b.len()
        };
        let floors = match frame {
            Data::Deliver {
                floor,
                key_floor,
                env,
            } => {
                let len =
                    |v: u64| varint_len(v) as i64 - varint_len(env.seq.wrapping_sub(v)) as i64;
                len(*floor) + key_floor.map_or(0, len)
            }
            _ => 0,
        };
        let saved = floors
            + match env {
                None => 0,
                Some(env) => {
                    env.origin = peer;
                    let binary = env.headers.trace().is_some();
                    // The origin; one byte for where the traceparent was; and, when it goes as
                    // binary, its name and text (1 + 11 + 1 + 55) for its 25 bytes.
                    32 - 1 + if binary { 68 - 25 } else { 0 }
                }
            };
        prop_assert_eq!(compact.len() as i64 + saved, full.len() as i64);
        prop_assert_eq!(back, expected);
        // The full dialect is serde's: decode_from reads it like decode_shared.
        let full = Data::decode_from(Bytes::from(full), Dialect::WithOrigin, peer)
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(&full, frame);
        Ok(())
    }

    /// `traceparent` values: the usual form (sent as binary) and near misses (sent as text).
    fn traceparent_strategy() -> impl Strategy<Value = String> {
        let usual = any::<[u8; 25]>().prop_map(|b| traceparent_text(&b));
        prop_oneof![
            usual.clone(),
            usual.clone().prop_map(|t| t.to_uppercase()),
            usual.clone().prop_map(|t| format!("{t} ")),
            usual.prop_map(|t| t.replacen("00-", "01-", 1)),
            "[0-9a-f-]{0,60}",
        ]
    }

    #[test]
    fn a_usual_traceparent_goes_as_binary_and_reads_back_as_text() {
        let text = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let b = headers::binary_traceparent(text).expect("the usual form");
        assert_eq!(traceparent_text(&b), text);
        for other in [
            "00-0AF7651916CD43DD8448EB211C80319C-B7AD6B7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-",
            "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c_b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319g-b7ad6b7169203331-01",
            "",
        ] {
            assert_eq!(headers::binary_traceparent(other), None, "{other}");
        }
        // A binary traceparent placed past the end of the headers is refused.
        let env = Envelope {
            origin: node(1),
            log: "l".into(),
            seq: 1,
            kind: Kind::Send,
            destination: "d".into(),
            key: None,
            headers: vec![(TRACEPARENT.into(), text.into())].into(),
            content_type: None,
            created_at_ms: 0,
            attempt: 1,
            payload: Bytes::new(),
        };
        let frame = Data::Request {
            budget_ms: 1,
            env: Arc::new(env),
        };
        let mut body = Vec::new();
        frame.encode_head_in(&mut body, Dialect::PeerOrigin);
        // variant, budget, log, seq, kind, destination, key: then the position byte.
        let at = 1 + 1 + 2 + 1 + 1 + 2 + 1;
        assert_eq!(body[at], 1);
        assert!(Data::decode_from(Bytes::from(body.clone()), Dialect::PeerOrigin, node(2)).is_ok());
        body[at] = 2;
        let err = Data::decode_from(Bytes::from(body), Dialect::PeerOrigin, node(2))
            .expect_err("past the end");
        assert!(
            err.to_string().contains("traceparent at header 1 of 1"),
            "{err}"
        );
    }

    /// Every single-byte change and every cut of a compact delivery with a binary
    /// `traceparent`: reading fails with an error or gives a frame, and never panics.
    #[test]
    fn changed_compact_bodies_never_panic() {
        let env = Envelope {
            origin: node(1),
            log: "svc:orders".into(),
            seq: 70_000,
            kind: Kind::Send,
            destination: "orders".into(),
            key: Some("k".into()),
            headers: vec![
                ("a".into(), "b".into()),
                (
                    TRACEPARENT.into(),
                    "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into(),
                ),
            ]
            .into(),
            content_type: Some("text/plain".into()),
            created_at_ms: 1_700_000_000_000,
            attempt: 2,
            payload: Bytes::from_static(b"payload"),
        };
        let frame = Data::Deliver {
            floor: 9,
            key_floor: Some(3),
            env: Arc::new(env),
        };
        let mut body = Vec::new();
        let payload = frame.encode_head_in(&mut body, Dialect::PeerOrigin);
        body.extend_from_slice(payload);
        let read =
            |b: &[u8]| Data::decode_from(Bytes::copy_from_slice(b), Dialect::PeerOrigin, node(1));
        assert_eq!(read(&body).expect("whole"), frame);
        for cut in 0..body.len() {
            assert!(
                read(&body[..cut]).is_err(),
                "a cut at {cut} read as a frame"
            );
        }
        for i in 0..body.len() {
            for b in 0..=u8::MAX {
                let mut changed = body.clone();
                changed[i] = b;
                let _ = read(&changed);
            }
        }
    }

    #[test]
    fn consecutive_acks_are_one_run_and_too_many_are_refused() {
        let seqs: Vec<u64> = (1_000_000_000_000_000..1_000_000_000_000_300)
            .rev()
            .collect();
        let runs = Control::ack_runs("svc:a".into(), seqs.clone());
        assert_eq!(
            runs,
            Control::AckRuns {
                log: "svc:a".into(),
                runs: vec![(1_000_000_000_000_000, 300)]
            }
        );
        let (mut plain, mut compact) = (Vec::new(), Vec::new());
        encode_frame(
            &Control::Ack {
                log: "svc:a".into(),
                seqs,
            },
            &mut plain,
            1 << 20,
        )
        .expect("encode");
        encode_frame(&runs, &mut compact, 1 << 20).expect("encode");
        assert!(
            compact.len() < 30 && plain.len() > 2_000,
            "{} and {} bytes",
            compact.len(),
            plain.len()
        );
        assert_eq!(
            Control::expand_runs(&[(5, MAX_ACK_RUN_SEQS)]).map(|s| s.len()),
            Some(1 << 20)
        );
        assert_eq!(Control::expand_runs(&[(5, MAX_ACK_RUN_SEQS), (1, 1)]), None);
        assert_eq!(Control::expand_runs(&[(0, u64::MAX), (0, 2)]), None);
    }

    #[test]
    fn versions_negotiate_to_the_highest_both_speak() {
        assert_eq!(negotiate(5..=5, 5..=5), Ok(5));
        assert_eq!(negotiate(5..=7, 5..=6), Ok(6));
        assert_eq!(negotiate(5..=6, 6..=9), Ok(6));
        let err = negotiate(5..=5, 6..=7).expect_err("no overlap");
        assert!(err.contains("5..=5") && err.contains("6..=7"), "{err}");
        assert!(negotiate(7..=8, 5..=6).is_err());
        // Protocol 4 is never negotiated: it has its own ALPN id and hello.
        assert!(negotiate(4..=4, 4..=4).is_err());
        assert_eq!(Dialect::of(4), Dialect::WithOrigin);
        assert_eq!(Dialect::of(5), Dialect::PeerOrigin);
    }

    /// Decodes `body` with serde and with [`Data::decode_shared`]: both fail, or both give the
    /// same frame.
    fn decoders_agree(body: Vec<u8>) -> Result<(), TestCaseError> {
        let serde = peerbus_transport::decode_body::<Data>(&body);
        let shared = Data::decode_shared(Bytes::from(body));
        match (serde, shared) {
            (Ok(a), Ok(b)) => prop_assert_eq!(a, b),
            (Err(_), Err(_)) => {}
            (a, b) => prop_assert!(false, "serde {a:?} but shared {b:?}"),
        }
        Ok(())
    }

    /// Every single-byte change and every cut of frames of each variant (with and without
    /// optional fields, with large integers): the two decoders agree on all of them. Random
    /// corruption (the proptest below) rarely hits a one-byte tag with the one wrong value
    /// that matters; this tries them all.
    #[test]
    fn shared_decoding_agrees_with_serde_on_every_byte_change() {
        let env = |key: Option<&str>, content_type: Option<&str>| Envelope {
            origin: node(7),
            log: "svc:orders".into(),
            seq: u64::MAX - 3,
            kind: Kind::Send,
            destination: "orders".into(),
            key: key.map(Into::into),
            headers: vec![
                ("traceparent".into(), "00-ab".into()),
                ("é".into(), String::new()),
            ]
            .into(),
            content_type: content_type.map(Into::into),
            created_at_ms: 1_700_000_000_000,
            attempt: 70_000,
            payload: Bytes::from_static(b"payload"),
        };
        let frames = [
            Data::Deliver {
                floor: 300,
                key_floor: Some(70_000),
                env: Arc::new(env(Some("k1"), Some("text/plain"))),
            },
            Data::Deliver {
                floor: 0,
                key_floor: None,
                env: Arc::new(env(None, None)),
            },
            Data::Request {
                budget_ms: 5_000,
                env: Arc::new(env(Some("k"), None)),
            },
            Data::Reply {
                corr: 1 << 40,
                result: Ok(Bytes::from_static(b"ok")),
            },
            Data::Reply {
                corr: 9,
                result: Err("no".into()),
            },
        ];
        for frame in frames {
            encoders_agree(&frame).expect("same bytes");
            let mut out = Vec::new();
            encode_frame(&frame, &mut out, 1 << 20).expect("encode");
            let body = out.split_off(4);
            for cut in 0..body.len() {
                decoders_agree(body[..cut].to_vec()).expect("a cut frame");
            }
            for i in 0..body.len() {
                for b in 0..=u8::MAX {
                    let mut changed = body.clone();
                    changed[i] = b;
                    decoders_agree(changed).expect("a changed byte");
                }
            }
        }
    }

    proptest! {
        #[test]
        fn compact_envelopes_read_back_exactly(env in env_strategy(), tp in traceparent_strategy(), at in any::<prop::sample::Index>(), floor in any::<u64>(), body in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut env = env;
            let mut list = env.headers.to_vec();
            list.insert(at.index(list.len() + 1), (TRACEPARENT.into(), tp));
            env.headers = list.into();
            dialects_agree(&Data::Deliver { floor, key_floor: None, env: Arc::new(env.clone()) })?;
            dialects_agree(&Data::Request { budget_ms: floor, env: Arc::new(env) })?;
            // Whatever a compact body holds, reading it fails or gives a frame; never a panic.
            let _ = Data::decode_from(Bytes::from(body), Dialect::PeerOrigin, node(9));
        }

        #[test]
        fn data_frames_round_trip(env in env_strategy(), floor in any::<u64>(), kf in proptest::option::of(any::<u64>()), budget in any::<u64>()) {
            roundtrip(Data::Deliver { floor, key_floor: kf, env: Arc::new(env.clone()) });
            roundtrip(Data::Request { budget_ms: budget, env: Arc::new(env.clone()) });
            roundtrip(Data::Reply { corr: floor, result: Ok(env.payload.clone()) });
            roundtrip(Data::Reply { corr: floor, result: Err(env.destination.to_string()) });
            roundtrip_shared(Data::Deliver { floor, key_floor: kf, env: Arc::new(env.clone()) });
            roundtrip_shared(Data::Request { budget_ms: budget, env: Arc::new(env.clone()) });
            roundtrip_shared(Data::Reply { corr: floor, result: Ok(env.payload.clone()) });
            roundtrip_shared(Data::Reply { corr: floor, result: Err(env.destination.to_string()) });
            encoders_agree(&Data::Deliver { floor, key_floor: kf, env: Arc::new(env.clone()) })?;
            encoders_agree(&Data::Request { budget_ms: budget, env: Arc::new(env.clone()) })?;
            encoders_agree(&Data::Reply { corr: budget, result: Ok(env.payload.clone()) })?;
            encoders_agree(&Data::Reply { corr: budget, result: Err(env.destination.to_string()) })?;
            dialects_agree(&Data::Deliver { floor, key_floor: kf, env: Arc::new(env.clone()) })?;
            dialects_agree(&Data::Request { budget_ms: budget, env: Arc::new(env.clone()) })?;
            dialects_agree(&Data::Reply { corr: budget, result: Ok(env.payload.clone()) })?;
            dialects_agree(&Data::Reply { corr: budget, result: Err(env.destination.to_string()) })?;
        }

        #[test]
        fn shared_decoding_agrees_with_serde_on_corrupted_frames(env in env_strategy(), variant in 0..4u8, n in any::<u64>(), at in any::<prop::sample::Index>(), byte in any::<u8>(), cut in any::<prop::sample::Index>()) {
            let frame = match variant {
                0 => Data::Deliver { floor: n, key_floor: Some(n / 2), env: Arc::new(env) },
                1 => Data::Request { budget_ms: n, env: Arc::new(env) },
                2 => Data::Reply { corr: n, result: Ok(env.payload) },
                _ => Data::Reply { corr: n, result: Err(env.destination.to_string()) },
            };
            let mut out = Vec::new();
            encode_frame(&frame, &mut out, 1 << 20).expect("encode");
            let mut body = out.split_off(4);
            let i = at.index(body.len());
            body[i] = byte;
            body.truncate(cut.index(body.len() + 1).max(i));
            decoders_agree(body)?;
        }

        #[test]
        fn shared_decoding_agrees_with_serde_on_any_body(body in proptest::collection::vec(any::<u8>(), 0..512)) {
            decoders_agree(body)?;
        }

        #[test]
        fn control_frames_round_trip(log in ".{0,16}", seqs in proptest::collection::vec(any::<u64>(), 0..50), reason in ".{0,30}", pat in ".{0,10}", group in proptest::option::of(".{0,6}"), credits in any::<u32>()) {
            let interests = vec![Interest { pattern: pat, group }];
            let hello = Hello { version: 4, node_id: node(3), service: log.clone(), mesh: reason.clone(), interests: interests.clone(), serves: true, credits, incarnation: 7, consumes: true, min_version: 4 };
            roundtrip(Control::Hello(Box::new(hello.clone())));
            roundtrip(ControlV4::Hello(hello.to_v4()));
            // Protocol 4's hello is today's without its last field: the bytes a protocol 4
            // build writes and reads.
            let (mut new, mut old) = (Vec::new(), Vec::new());
            encode_frame(&Control::Hello(Box::new(hello.clone())), &mut new, 1 << 20).expect("encode");
            encode_frame(&ControlV4::Hello(hello.to_v4()), &mut old, 1 << 20).expect("encode");
            prop_assert_eq!(&new[4..new.len() - 1], &old[4..]);
            prop_assert_eq!(new.last(), Some(&4));
            prop_assert_eq!(Hello::from(hello.to_v4()), hello);
            roundtrip(Control::Interests(interests));
            roundtrip(Control::Ack { log: log.clone(), seqs: seqs.clone() });
            roundtrip(Control::Nack { log, seq: seqs.first().copied().unwrap_or(0), reason, permanent: true });
            roundtrip(Control::Goodbye);
            roundtrip(Control::Serves(true));
            roundtrip(Control::Groups(vec![
                ("g".into(), GroupState { version: 3, patterns: vec!["a.>".into()] }),
                ("h".into(), GroupState { version: 7, patterns: vec![] }),
            ]));
            roundtrip(Control::Retired);
            roundtrip(Control::Consumes(false));
            roundtrip(Control::ack_runs("svc:x".into(), seqs.clone()));
            roundtrip(Control::Revocations(vec![Bytes::from(vec![0x30, 0x82]), Bytes::new()]));
        }

        #[test]
        fn ack_runs_hold_the_same_seqs(seqs in proptest::collection::vec(prop_oneof![0..40u64, any::<u64>(), (u64::MAX - 5)..=u64::MAX], 0..60)) {
            let Control::AckRuns { runs, .. } = Control::ack_runs("l".into(), seqs.clone()) else {
                panic!("not runs");
            };
            let mut want = seqs;
            want.sort_unstable();
            want.dedup();
            prop_assert_eq!(Control::expand_runs(&runs), Some(want));
        }

        #[test]
        fn decoding_garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode_frame::<Data>(&bytes, 1 << 16);
            let _ = decode_frame::<Control>(&bytes, 1 << 16);
        }
    }
}
