//! A reader of [`Data`] frame bodies in bincode 2's standard layout, written out by hand for
//! [`Data::decode_shared`].
//!
//! The layout, as serde writes it through bincode (`standard()` config: little endian,
//! variable-length integers):
//! - an unsigned integer below 251 is one byte; 251, 252 and 253 announce a `u16`, `u32` or
//!   `u64` in the next 2, 4 or 8 bytes (a `u32` field refuses 253; 254 and 255 are refused);
//! - an enum variant is its index as a `u32`; a struct's fields follow each other in order;
//! - an `Option` is one byte, 0 (`None`) or 1 (`Some`, then the value);
//! - a string or byte string is its length (a `u64`) and then its bytes; strings must be UTF-8;
//! - a sequence is its length and then its elements; a tuple or array just its elements
//!   (a [`NodeId`] is 32 single bytes).
//!
//! Accepting exactly what serde accepts, with the same result, is the contract; the proptests
//! in `wire` check it on valid, corrupted and random bodies.

use std::sync::Arc;

use bytes::Bytes;
use peerbus_transport::{FrameError, NodeId};
use smol_str::SmolStr;

use super::{Data, Envelope, Headers, Kind};

/// Decodes a whole body: one [`Data`] frame and nothing after it. With `peer`, envelopes on the
/// wire leave their origin out and it is `peer` ([`super::Dialect::PeerOrigin`]).
pub(super) fn data(body: Bytes, peer: Option<NodeId>) -> Result<Data, FrameError> {
    let mut r = Reader { buf: &body, pos: 0 };
    let frame = match r.u32()? {
        0 => {
            let floor = r.u64()?;
            let key_floor = if r.option()? { Some(r.u64()?) } else { None };
            let env = r.envelope(&body, peer)?;
            // From protocol 5 the floors are distances below the entry's seq.
            let at = |v: u64| match peer {
                Some(_) => env.seq.wrapping_sub(v),
                None => v,
            };
            Data::Deliver {
                floor: at(floor),
                key_floor: key_floor.map(at),
                env: Arc::new(env),
            }
        }
        1 => {
            let budget_ms = r.u64()?;
            let env = Arc::new(r.envelope(&body, peer)?);
            Data::Request { budget_ms, env }
        }
        2 => {
            let corr = r.u64()?;
            let result = match r.u32()? {
                0 => Ok(body.slice_ref(r.bytes()?)),
                1 => Err(r.string()?),
                v => return Err(malformed(format!("unknown result variant {v}"))),
            };
            Data::Reply { corr, result }
        }
        v => return Err(malformed(format!("unknown data frame variant {v}"))),
    };
    let trailing = r.buf.len() - r.pos;
    if trailing != 0 {
        return Err(malformed(format!(
            "{trailing} trailing bytes after the frame"
        )));
    }
    Ok(frame)
}

fn malformed(why: String) -> FrameError {
    FrameError::Malformed(why)
}

/// A cursor over a frame body. Every read checks the bytes left, so no length in the body can
/// make it read past the end or allocate more than the body holds.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], FrameError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&end| end <= self.buf.len())
            .ok_or_else(|| malformed("frame ends early".into()))?;
        let out = &self.buf[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], FrameError> {
        let mut out = [0; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn byte(&mut self) -> Result<u8, FrameError> {
        Ok(self.array::<1>()?[0])
    }

    /// A variable-length integer of at most `max_tag`'s width (252: `u32`, 253: `u64`).
    fn varint(&mut self, max_tag: u8) -> Result<u64, FrameError> {
        let tag = self.byte()?;
        let v = match tag {
            0..=250 => u64::from(tag),
            251 => u64::from(u16::from_le_bytes(self.array()?)),
            252 if max_tag >= 252 => u64::from(u32::from_le_bytes(self.array()?)),
            253 if max_tag >= 253 => u64::from_le_bytes(self.array()?),
            _ => return Err(malformed(format!("invalid integer tag {tag}"))),
        };
        Ok(v)
    }

    fn u64(&mut self) -> Result<u64, FrameError> {
        self.varint(253)
    }

    fn u32(&mut self) -> Result<u32, FrameError> {
        // A 252 tag or below always fits.
        u32::try_from(self.varint(252)?).map_err(|_| malformed("integer too large".into()))
    }

    fn len(&mut self) -> Result<usize, FrameError> {
        usize::try_from(self.u64()?).map_err(|_| malformed("length too large".into()))
    }

    fn option(&mut self) -> Result<bool, FrameError> {
        match self.byte()? {
            0 => Ok(false),
            1 => Ok(true),
            t => Err(malformed(format!("invalid option tag {t}"))),
        }
    }

    fn bytes(&mut self) -> Result<&'a [u8], FrameError> {
        let n = self.len()?;
        self.take(n)
    }

    fn str(&mut self) -> Result<&'a str, FrameError> {
        std::str::from_utf8(self.bytes()?).map_err(|e| malformed(format!("invalid UTF-8: {e}")))
    }

    fn string(&mut self) -> Result<String, FrameError> {
        self.str().map(str::to_owned)
    }

    /// An `Option`: its tag, then `read` when it is `Some`.
    fn optional<T>(
        &mut self,
        read: impl FnOnce(&mut Self) -> Result<T, FrameError>,
    ) -> Result<Option<T>, FrameError> {
        if self.option()? {
            read(self).map(Some)
        } else {
            Ok(None)
        }
    }

    /// A string kept inline when short (log names, destinations, keys): no allocation.
    fn small_string(&mut self) -> Result<SmolStr, FrameError> {
        self.str().map(SmolStr::new)
    }

    fn kind(&mut self) -> Result<Kind, FrameError> {
        Ok(match self.u32()? {
            0 => Kind::Send,
            1 => Kind::Publish,
            2 => Kind::Request,
            3 => Kind::Reply,
            v => return Err(malformed(format!("unknown message kind {v}"))),
        })
    }

    fn headers(&mut self) -> Result<Vec<(String, String)>, FrameError> {
        let n = self.len()?;
        // Each header takes at least two bytes (two empty strings), so the body bounds the
        // allocation whatever the length says.
        let mut out = Vec::with_capacity(n.min((self.buf.len() - self.pos) / 2));
        for _ in 0..n {
            let k = self.string()?;
            out.push((k, self.string()?));
        }
        Ok(out)
    }

    /// The headers as [`Dialect::PeerOrigin`](super::Dialect::PeerOrigin) writes them (see
    /// `encode.rs`, `compact_headers`): a binary `traceparent` stays bytes, in its place.
    fn compact_headers(&mut self) -> Result<Headers, FrameError> {
        let at = self.len()?;
        let traceparent = if at > 0 {
            Some(self.array::<25>()?)
        } else {
            None
        };
        let headers = self.headers()?;
        let n = headers.len();
        Headers::from_parts(headers, traceparent.map(|b| (at - 1, b)))
            .ok_or_else(|| malformed(format!("traceparent at header {} of {}", at - 1, n + 1)))
    }

    /// An [`Envelope`] whose payload is a slice of `body` (the buffer this reader reads), from
    /// `peer` when the wire leaves the origin out.
    fn envelope(&mut self, body: &Bytes, peer: Option<NodeId>) -> Result<Envelope, FrameError> {
        let origin = match peer {
            Some(peer) => peer,
            None => NodeId::from_bytes(self.array()?),
        };
        Ok(Envelope {
            origin,
            log: self.small_string()?,
            seq: self.u64()?,
            kind: self.kind()?,
            destination: self.small_string()?,
            key: self.optional(Self::small_string)?,
            headers: if peer.is_some() {
                self.compact_headers()?
            } else {
                Headers::from(self.headers()?)
            },
            content_type: self.optional(Self::string)?,
            created_at_ms: self.u64()?,
            attempt: self.u32()?,
            payload: body.slice_ref(self.bytes()?),
        })
    }
}
