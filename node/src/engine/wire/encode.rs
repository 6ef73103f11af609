//! A writer of [`Data`] frame bodies in bincode 2's standard layout (described in
//! `decode.rs`), written out by hand for the connection writer: the same bytes serde writes
//! through bincode, without its generic per-field path. The proptests in `wire` compare the
//! two byte for byte. The store's side log writes its entries with it too (`store/wal.rs`,
//! whose proptest compares whole records with serde's).

use bytes::Bytes;

use super::{Data, Dialect, Envelope, Headers, Kind};

/// The payload of a frame that carries none.
static NO_PAYLOAD: Bytes = Bytes::new();

impl Data {
    /// Appends this frame's body (no length prefix) to `out`: exactly the bytes bincode's
    /// serde encoder writes for it.
    pub fn encode_body(&self, out: &mut Vec<u8>) {
        let payload = self.encode_head(out);
        out.extend_from_slice(payload);
    }

    /// The payload this frame ends with (empty for a failed reply).
    pub fn payload(&self) -> &Bytes {
        match self {
            Data::Deliver { env, .. } => &env.payload,
            Data::Request { env, .. } => &env.payload,
            Data::Reply { result: Ok(p), .. } => p,
            Data::Reply { result: Err(_), .. } => &NO_PAYLOAD,
        }
    }

    /// Appends this frame's body up to its payload's bytes (their length included) and
    /// returns the payload, which ends the body: the head, then the payload, are exactly
    /// [`Data::encode_body`]'s bytes. The connection writer hands a large payload to QUIC as
    /// it is instead of copying it.
    pub fn encode_head(&self, out: &mut Vec<u8>) -> &Bytes {
        self.encode_head_in(out, Dialect::WithOrigin)
    }

    /// [`Data::encode_head`] for a connection of `dialect` (see [`Dialect::PeerOrigin`] for
    /// what differs).
    pub fn encode_head_in(&self, out: &mut Vec<u8>, dialect: Dialect) -> &Bytes {
        match self {
            Data::Deliver {
                floor,
                key_floor,
                env,
            } => {
                // Both floors are at most the entry's seq: as distances below it they take a
                // byte or two instead of up to nine (wrapping, so any value reads back).
                let below = |v: u64| match dialect {
                    Dialect::WithOrigin => v,
                    Dialect::PeerOrigin => env.seq.wrapping_sub(v),
                };
                varint(out, 0);
                varint(out, below(*floor));
                opt_u64(out, key_floor.map(below));
                envelope_head(out, env, dialect)
            }
            Data::Request { budget_ms, env } => {
                varint(out, 1);
                varint(out, *budget_ms);
                envelope_head(out, env, dialect)
            }
            Data::Reply { corr, result } => {
                varint(out, 2);
                varint(out, *corr);
                match result {
                    Ok(payload) => {
                        varint(out, 0);
                        varint(out, payload.len() as u64);
                        payload
                    }
                    Err(e) => {
                        varint(out, 1);
                        bytes(out, e.as_bytes());
                        &NO_PAYLOAD
                    }
                }
            }
        }
    }
}

impl Envelope {
    /// Appends this envelope in bincode's standard layout: exactly the bytes bincode's serde
    /// encoder writes for it (the store's side log writes entries with it too).
    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        envelope(out, self);
    }
}

/// Appends an `Option<u64>` as bincode's serde encoder writes it: a tag byte (0 or 1), then
/// the value as a [`varint`].
pub(crate) fn opt_u64(out: &mut Vec<u8>, v: Option<u64>) {
    match v {
        Some(v) => {
            out.push(1);
            varint(out, v);
        }
        None => out.push(0),
    }
}

/// bincode's variable-length unsigned integer: one byte below 251, else a tag (251, 252, 253)
/// and the value as little-endian `u16`, `u32` or `u64`, the smallest that holds it.
pub(crate) fn varint(out: &mut Vec<u8>, v: u64) {
    if v < 251 {
        out.push(v as u8);
    } else if let Ok(v) = u16::try_from(v) {
        out.push(251);
        out.extend_from_slice(&v.to_le_bytes());
    } else if let Ok(v) = u32::try_from(v) {
        out.push(252);
        out.extend_from_slice(&v.to_le_bytes());
    } else {
        out.push(253);
        out.extend_from_slice(&v.to_le_bytes());
    }
}

/// A list of headers as serde writes it: its length, then each name and value.
fn headers(out: &mut Vec<u8>, list: &[(String, String)]) {
    varint(out, list.len() as u64);
    for (k, v) in list {
        header(out, k, v);
    }
}

fn header(out: &mut Vec<u8>, k: &str, v: &str) {
    bytes(out, k.as_bytes());
    bytes(out, v.as_bytes());
}

/// The headers in [`Dialect::PeerOrigin`]: the position of the `traceparent` the headers keep
/// as bytes, plus one (0: none), then its 25 bytes, then the other headers as [`headers`]
/// writes them. The reader keeps it as bytes in its place, so the envelope reads back
/// exactly; a `traceparent` costs 26 bytes instead of 68.
fn compact_headers(out: &mut Vec<u8>, h: &Headers) {
    let (list, trace) = h.parts();
    match trace {
        Some((at, b)) => {
            varint(out, at as u64 + 1);
            out.extend_from_slice(b);
        }
        None => out.push(0),
    }
    headers(out, list);
}

/// A string or byte string: its length, then its bytes.
fn bytes(out: &mut Vec<u8>, b: &[u8]) {
    varint(out, b.len() as u64);
    out.extend_from_slice(b);
}

fn opt_str(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        Some(s) => {
            out.push(1);
            bytes(out, s.as_bytes());
        }
        None => out.push(0),
    }
}

fn envelope(out: &mut Vec<u8>, env: &Envelope) {
    let payload = envelope_head(out, env, Dialect::WithOrigin);
    out.extend_from_slice(payload);
}

/// The envelope up to its payload's bytes (the payload is its last field); returns the
/// payload. [`Dialect::PeerOrigin`] leaves the origin out.
fn envelope_head<'e>(out: &mut Vec<u8>, env: &'e Envelope, dialect: Dialect) -> &'e Bytes {
    if dialect == Dialect::WithOrigin {
        out.extend_from_slice(env.origin.as_bytes());
    }
    bytes(out, env.log.as_bytes());
    varint(out, env.seq);
    let kind = match env.kind {
        Kind::Send => 0,
        Kind::Publish => 1,
        Kind::Request => 2,
        Kind::Reply => 3,
    };
    varint(out, kind);
    bytes(out, env.destination.as_bytes());
    opt_str(out, env.key.as_deref());
    match dialect {
        Dialect::WithOrigin => {
            varint(out, env.headers.len() as u64);
            env.headers.for_each(|k, v| header(out, k, v));
        }
        Dialect::PeerOrigin => compact_headers(out, &env.headers),
    }
    opt_str(out, env.content_type.as_deref());
    varint(out, env.created_at_ms);
    varint(out, u64::from(env.attempt));
    varint(out, env.payload.len() as u64);
    &env.payload
}
