//! Frames: `u32` little-endian length prefix + bincode 2 (standard config).
//!
//! [`FrameSender`] coalesces frames into one buffer and writes it with one
//! call: a write per frame costs about 7 µs in quinn, a batched write a small
//! fraction of that per frame. [`FrameReceiver`] reads large chunks and parses
//! every complete frame they hold.

use bytes::{Buf, Bytes, BytesMut};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tracing::warn;

use crate::endpoint::Connection;
use crate::error::{CloseCode, ConnectionError};

/// bincode configuration; the limit stops a hostile length field inside a frame from
/// allocating more than a frame could ever hold.
fn config() -> bincode::config::Configuration<
    bincode::config::LittleEndian,
    bincode::config::Varint,
    bincode::config::Limit<{ 64 * 1024 * 1024 }>,
> {
    bincode::config::standard().with_limit::<{ 64 * 1024 * 1024 }>()
}

/// A frame could not be written or read.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The frame is larger than the maximum frame size.
    #[error("frame of {len} bytes exceeds the maximum of {max} bytes")]
    TooLarge {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The bytes are not a valid frame.
    #[error("malformed frame: {0}")]
    Malformed(String),
    /// The stream ended in the middle of a frame.
    #[error("stream ended in the middle of a frame")]
    Truncated,
    /// The connection failed.
    #[error(transparent)]
    Connection(#[from] ConnectionError),
}

/// Appends one encoded frame (length prefix + bincode) to `out`.
pub fn encode_frame<T: Serialize>(
    frame: &T,
    out: &mut Vec<u8>,
    max: usize,
) -> Result<(), FrameError> {
    let start = out.len();
    out.extend_from_slice(&[0; 4]);
    if let Err(e) = bincode::serde::encode_into_writer(frame, VecWriter(out), config()) {
        out.truncate(start);
        return Err(FrameError::Malformed(format!("cannot encode: {e}")));
    }
    finish_frame(out, start, max)
}

/// Writes the length prefix of the frame that starts at `start` in `out` (4 bytes reserved
/// there, the body after them), or removes the frame if its body is over `max`.
fn finish_frame(out: &mut Vec<u8>, start: usize, max: usize) -> Result<(), FrameError> {
    finish_frame_before(out, start, 0, max)
}

/// Like [`finish_frame`] for a frame whose last `tail` bytes are not in `out` but follow it.
fn finish_frame_before(
    out: &mut Vec<u8>,
    start: usize,
    tail: usize,
    max: usize,
) -> Result<(), FrameError> {
    let len = out.len() - start - 4 + tail;
    if len > max || len > u32::MAX as usize {
        out.truncate(start);
        return Err(FrameError::TooLarge { len, max });
    }
    out[start..start + 4].copy_from_slice(&(len as u32).to_le_bytes());
    Ok(())
}

/// bincode's output into a `Vec`. Inlined, so that the many small writes of a frame (single
/// bytes, varints) become plain stores: through `std::io::Write` each was a `memcpy` call.
struct VecWriter<'a>(&'a mut Vec<u8>);

impl bincode::enc::write::Writer for VecWriter<'_> {
    #[inline]
    fn write(&mut self, bytes: &[u8]) -> Result<(), bincode::error::EncodeError> {
        self.0.extend_from_slice(bytes);
        Ok(())
    }
}

/// The body length a frame's prefix at the start of `buf` gives: `Ok(None)` while `buf` is
/// shorter than the prefix, an error when the length is over `max`.
fn body_len(buf: &[u8], max: usize) -> Result<Option<usize>, FrameError> {
    let Some(prefix) = buf.get(..4) else {
        return Ok(None);
    };
    let len = u32::from_le_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]) as usize;
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    Ok(Some(len))
}

/// Decodes the first frame of `buf`: `Ok(None)` when `buf` does not hold a whole frame yet,
/// otherwise the frame and the bytes it used. The length is checked against `max` before
/// anything is allocated.
pub fn decode_frame<T: DeserializeOwned>(
    buf: &[u8],
    max: usize,
) -> Result<Option<(T, usize)>, FrameError> {
    let Some(len) = body_len(buf, max)? else {
        return Ok(None);
    };
    let Some(body) = buf.get(4..4 + len) else {
        return Ok(None);
    };
    Ok(Some((decode_body(body)?, 4 + len)))
}

/// Decodes one frame's body (the bytes after its length prefix), which it must fill exactly.
/// `T` may borrow from `body` (`&str`, `&[u8]` fields): with [`FrameReceiver::recv_shared`]
/// a decoder keeps such slices as [`Bytes`] of the receive buffer instead of copying them.
pub fn decode_body<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, FrameError> {
    let (value, used) = bincode::serde::borrow_decode_from_slice(body, config())
        .map_err(|e| FrameError::Malformed(e.to_string()))?;
    if used != body.len() {
        return Err(FrameError::Malformed(format!(
            "{} trailing bytes after the frame",
            body.len() - used
        )));
    }
    Ok(value)
}

/// Writes frames to one QUIC stream, coalescing them.
///
/// [`push`](Self::push) only encodes into a buffer; [`flush`](Self::flush) hands the whole
/// buffer to QUIC at once. Flush when a batch is complete (or when
/// [`buffered_bytes`](Self::buffered_bytes) grows past what you want to hold): the buffer is
/// not bounded by itself.
pub struct FrameSender {
    stream: quinn::SendStream,
    /// Frames pushed since `chunks` last took the buffered bytes.
    buf: Vec<u8>,
    /// Frame bytes queued ahead of `buf`, oldest first, as QUIC takes them: what `buf` held
    /// (see [`FrameSender::queue_buffered`]) and each large payload (shared, not copied).
    /// Bounded like `buf`: by what the caller pushes between flushes.
    chunks: Vec<Bytes>,
    /// Bytes in `chunks` not yet handed to QUIC.
    chunked: usize,
    max: usize,
    conn: Connection,
}

impl std::fmt::Debug for FrameSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameSender")
            .field("peer", &self.conn.peer_id())
            .field("buffered", &self.buffered_bytes())
            .finish_non_exhaustive()
    }
}

/// Initial capacity of a sender's buffer, and what it shrinks back to after a huge batch.
const SEND_BUF: usize = 64 * 1024;
/// A sender's buffer capacity above which it is released after a flush.
const SEND_BUF_KEEP: usize = 4 * 1024 * 1024;
/// Largest chunk a receiver takes from QUIC at once.
const READ_CHUNK: usize = 256 * 1024;
/// Payloads at least this large are handed to QUIC as the caller's shared [`Bytes`] by
/// [`FrameSender::push_encoded_with_payload`] instead of being copied into the buffer (and
/// then again by QUIC). Smaller ones are copied: below this size a copy costs less than the
/// extra chunk.
pub const SHARED_PAYLOAD_MIN: usize = 4 * 1024;

impl FrameSender {
    pub(crate) fn new(stream: quinn::SendStream, max: usize, conn: Connection) -> Self {
        Self {
            stream,
            buf: Vec::with_capacity(SEND_BUF),
            chunks: Vec::new(),
            chunked: 0,
            max,
            conn,
        }
    }

    /// Encodes a frame into the write buffer (no I/O). A frame over the maximum frame size is
    /// refused with [`FrameError::TooLarge`] and leaves the buffer as it was.
    pub fn push<T: Serialize>(&mut self, frame: &T) -> Result<(), FrameError> {
        encode_frame(frame, &mut self.buf, self.max)
    }

    /// Like [`FrameSender::push`], for a frame whose body `encode` appends to the buffer itself
    /// (the same bytes bincode would write, produced without serde). A body over the maximum
    /// frame size is refused with [`FrameError::TooLarge`] and leaves the buffer as it was.
    pub fn push_encoded(&mut self, encode: impl FnOnce(&mut Vec<u8>)) -> Result<(), FrameError> {
        let start = self.buf.len();
        self.buf.extend_from_slice(&[0; 4]);
        encode(&mut self.buf);
        finish_frame(&mut self.buf, start, self.max)
    }

    /// Like [`FrameSender::push_encoded`], for a frame whose body ends with `payload`:
    /// `encode_head` appends the body up to the payload's bytes. A payload of at least
    /// [`SHARED_PAYLOAD_MIN`] bytes is not copied: the frame goes to QUIC as the buffered bytes
    /// and then `payload` itself (a clone of the `Bytes`, sharing its memory).
    pub fn push_encoded_with_payload(
        &mut self,
        encode_head: impl FnOnce(&mut Vec<u8>),
        payload: &Bytes,
    ) -> Result<(), FrameError> {
        if payload.len() < SHARED_PAYLOAD_MIN {
            return self.push_encoded(|buf| {
                encode_head(buf);
                buf.extend_from_slice(payload);
            });
        }
        let start = self.buf.len();
        self.buf.extend_from_slice(&[0; 4]);
        encode_head(&mut self.buf);
        finish_frame_before(&mut self.buf, start, payload.len(), self.max)?;
        // Everything buffered so far (this frame's head included) goes ahead of the payload.
        self.queue_buffered();
        self.chunked += payload.len();
        self.chunks.push(payload.clone());
        Ok(())
    }

    /// Moves the frames in `buf` to the end of `chunks`. When they fill at least half of its
    /// capacity the buffer itself goes (QUIC keeps it without copying, and holds at most twice
    /// the bytes it counts against the send window) and a new one takes its place; fewer are
    /// copied out, so the buffer's memory is not pinned for a few bytes.
    fn queue_buffered(&mut self) {
        let len = self.buf.len();
        if len == 0 {
            return;
        }
        let bytes = if len * 2 >= self.buf.capacity() {
            Bytes::from(std::mem::replace(
                &mut self.buf,
                Vec::with_capacity(SEND_BUF),
            ))
        } else {
            let copied = Bytes::copy_from_slice(&self.buf);
            self.buf.clear();
            copied
        };
        self.chunked += len;
        self.chunks.push(bytes);
    }

    /// Bytes waiting for [`FrameSender::flush`].
    pub fn buffered_bytes(&self) -> usize {
        self.chunked + self.buf.len()
    }

    /// Hands everything buffered to QUIC as one write (one `write_chunks` call per congestion
    /// or flow-control wait, as `write_all` does), returning once QUIC has taken it all.
    ///
    /// Cancel-safe: if the future is dropped, the bytes not yet taken stay buffered and the
    /// next flush continues where this one stopped, so no frame is cut or repeated.
    pub async fn flush(&mut self) -> Result<(), FrameError> {
        // What `buf` holds goes behind the chunks, which are older. QUIC advances a chunk it
        // took in part, in place.
        self.queue_buffered();
        while !self.chunks.is_empty() {
            match self.stream.write_chunks(&mut self.chunks).await {
                Ok(w) => {
                    self.chunked -= w.bytes;
                    self.chunks.drain(..w.chunks);
                }
                Err(e) => {
                    self.reset_buffer();
                    return Err(self.write_error(e));
                }
            }
        }
        self.reset_buffer();
        Ok(())
    }

    fn reset_buffer(&mut self) {
        self.chunks.clear();
        self.chunked = 0;
        self.buf.clear();
        if self.buf.capacity() > SEND_BUF_KEEP {
            self.buf.shrink_to(SEND_BUF);
        }
    }

    /// Pushes one frame and flushes.
    pub async fn send<T: Serialize>(&mut self, frame: &T) -> Result<(), FrameError> {
        self.push(frame)?;
        self.flush().await
    }

    /// Flushes and finishes the stream (the reader sees a clean end).
    pub async fn finish(mut self) -> Result<(), FrameError> {
        self.flush().await?;
        self.finish_stream()
    }

    /// Finishes the QUIC stream (after everything was flushed).
    fn finish_stream(&mut self) -> Result<(), FrameError> {
        self.stream.finish().map_err(|e| {
            FrameError::Connection(ConnectionError::Transport(format!(
                "cannot finish the stream: {e}"
            )))
        })
    }

    /// Flushes and finishes the stream, then waits until the peer has acknowledged every byte
    /// of it (not necessarily read them): what was sent survives closing the connection next,
    /// which discards stream data not yet delivered. An error if the peer stopped the stream
    /// or the connection was lost first. Bound the wait with a timeout: a peer that stopped
    /// answering never acknowledges.
    pub async fn finish_delivered(mut self) -> Result<(), FrameError> {
        self.flush().await?;
        self.finish_stream()?;
        match self.stream.stopped().await {
            Ok(None) => Ok(()),
            Ok(Some(code)) => Err(FrameError::Connection(ConnectionError::Transport(format!(
                "the peer stopped the stream (code {code})"
            )))),
            Err(e) => Err(FrameError::Connection(ConnectionError::Transport(format!(
                "the stream was not delivered: {e}"
            )))),
        }
    }

    /// Writes raw bytes, bypassing the codec (after flushing what is buffered). Only for
    /// tests of malformed input.
    #[doc(hidden)]
    pub async fn write_raw_for_tests(&mut self, bytes: &[u8]) -> Result<(), FrameError> {
        self.flush().await?;
        let res = self.stream.write_all(bytes).await;
        res.map_err(|e| self.write_error(e))
    }

    fn write_error(&self, e: quinn::WriteError) -> FrameError {
        match e {
            quinn::WriteError::ConnectionLost(c) => FrameError::Connection(self.conn.convert(c)),
            quinn::WriteError::Stopped(code) => FrameError::Connection(ConnectionError::Transport(
                format!("the peer stopped the stream (code {code})"),
            )),
            other => FrameError::Connection(ConnectionError::Transport(other.to_string())),
        }
    }
}

/// Reads frames from one QUIC stream: takes large chunks from QUIC and parses every complete
/// frame they hold. Holds at most one partial frame (bounded by the maximum frame size) plus
/// one chunk.
pub struct FrameReceiver {
    stream: quinn::RecvStream,
    read: Reassembly,
    max: usize,
    conn: Connection,
}

/// Frames cut out of the chunks a stream gives, in order. A frame wholly inside a chunk is a
/// slice of it, not a copy; only a frame that a chunk's end cuts is copied, into `partial`,
/// and completed from the next chunks. Holds at most one partial frame (its length checked
/// against the maximum before anything is copied) and one chunk.
#[derive(Debug)]
struct Reassembly {
    /// The start of a frame the end of a chunk cut, copied out of it. Cut frames are split off
    /// the front of one buffer of [`SEND_BUF`] bytes or more, so they share its allocations
    /// instead of taking one each.
    partial: BytesMut,
    /// What is left of the last chunk; parsed after `partial`.
    chunk: Bytes,
}

impl Reassembly {
    fn new() -> Self {
        Self {
            partial: BytesMut::with_capacity(SEND_BUF),
            chunk: Bytes::new(),
        }
    }

    /// Takes the next chunk; call it only once [`Reassembly::next_body`] returned `None`.
    fn push(&mut self, chunk: Bytes) {
        debug_assert!(self.chunk.is_empty(), "a chunk came over an unparsed one");
        self.chunk = chunk;
    }

    /// Bytes held that are not yet part of a returned frame.
    fn len(&self) -> usize {
        self.partial.len() + self.chunk.len()
    }

    /// Drops everything held.
    fn clear(&mut self) {
        self.partial.clear();
        self.chunk.clear();
    }

    /// The body of the next frame (without its length prefix), if all of it has come;
    /// an error when its length is over `max`.
    fn next_body(&mut self, max: usize) -> Result<Option<Bytes>, FrameError> {
        loop {
            if self.partial.is_empty() {
                let whole = body_len(&self.chunk, max)?.map(|len| 4 + len);
                if let Some(whole) = whole
                    && whole <= self.chunk.len()
                {
                    let mut frame = self.chunk.split_to(whole);
                    frame.advance(4);
                    return Ok(Some(frame));
                }
                // Room for the whole frame at once (its length is at most `max`), or for the
                // length prefix when a cut fell inside it.
                self.partial.reserve(whole.unwrap_or(4));
                self.partial.extend_from_slice(&self.chunk);
                self.chunk.clear();
                return Ok(None);
            }
            // A cut length prefix is completed first, then the frame it gives.
            let whole = body_len(&self.partial, max)?.map_or(4, |len| 4 + len);
            let missing = whole.saturating_sub(self.partial.len());
            if missing == 0 {
                let mut frame = self.partial.split_to(whole);
                frame.advance(4);
                return Ok(Some(frame.freeze()));
            }
            if self.chunk.is_empty() {
                return Ok(None);
            }
            self.partial.reserve(missing);
            let take = missing.min(self.chunk.len());
            self.partial.extend_from_slice(&self.chunk.split_to(take));
        }
    }
}

impl std::fmt::Debug for FrameReceiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameReceiver")
            .field("peer", &self.conn.peer_id())
            .field("buffered", &self.read.len())
            .finish_non_exhaustive()
    }
}

impl FrameReceiver {
    pub(crate) fn new(stream: quinn::RecvStream, max: usize, conn: Connection) -> Self {
        Self {
            stream,
            read: Reassembly::new(),
            max,
            conn,
        }
    }

    /// The next frame; `Ok(None)` at a clean end of the stream. A malformed or oversized frame
    /// closes the whole connection with [`CloseCode::MalformedFrame`] or
    /// [`CloseCode::FrameTooLarge`], is logged, and returns the error. A stream that ends
    /// inside a frame gives [`FrameError::Truncated`].
    ///
    /// Cancel-safe: dropping the future loses no data (use it in `select!`).
    pub async fn recv<T: DeserializeOwned>(&mut self) -> Result<Option<T>, FrameError> {
        loop {
            if let Some(v) = self.try_recv_buffered()? {
                return Ok(Some(v));
            }
            if !self.fill().await? {
                return Ok(None);
            }
        }
    }

    /// Like [`recv`](Self::recv), but `decode` turns each frame's body (without its length
    /// prefix) into a `T`. The body shares the receive buffer, so a decoder can keep slices of
    /// it ([`Bytes::slice_ref`], for a payload) without copying them; such a slice keeps the
    /// buffer it came from (about one read chunk) alive while it lives. An error from `decode`
    /// is handled like a malformed frame. Cancel-safe like [`recv`](Self::recv).
    pub async fn recv_shared<T>(
        &mut self,
        decode: impl Fn(Bytes) -> Result<T, FrameError>,
    ) -> Result<Option<T>, FrameError> {
        loop {
            if let Some(body) = self.next_body()? {
                return match decode(body) {
                    Ok(v) => Ok(Some(v)),
                    Err(e) => Err(self.fail(e)),
                };
            }
            if !self.fill().await? {
                return Ok(None);
            }
        }
    }

    /// Reads the next chunk (called once the last one is parsed): false at a clean end of the
    /// stream.
    async fn fill(&mut self) -> Result<bool, FrameError> {
        match self.stream.read_chunk(READ_CHUNK, true).await {
            Ok(Some(chunk)) => {
                self.read.push(chunk.bytes);
                Ok(true)
            }
            Ok(None) if self.read.len() == 0 => Ok(false),
            Ok(None) => Err(FrameError::Truncated),
            Err(quinn::ReadError::ConnectionLost(e)) => {
                Err(FrameError::Connection(self.conn.convert(e)))
            }
            Err(e) => Err(FrameError::Connection(ConnectionError::Transport(format!(
                "cannot read the stream: {e}"
            )))),
        }
    }

    /// Takes the body of the next frame out of what was read, if all of it has come.
    fn next_body(&mut self) -> Result<Option<Bytes>, FrameError> {
        self.read.next_body(self.max).map_err(|e| self.fail(e))
    }

    /// The next frame already read, without I/O: `Ok(None)` when no complete frame was read.
    /// Bad frames are handled as in [`recv`](Self::recv).
    pub fn try_recv_buffered<T: DeserializeOwned>(&mut self) -> Result<Option<T>, FrameError> {
        let Some(body) = self.next_body()? else {
            return Ok(None);
        };
        match decode_body(&body) {
            Ok(v) => Ok(Some(v)),
            Err(e) => Err(self.fail(e)),
        }
    }

    /// Closes the connection over a bad frame (logged) and drops what is buffered.
    fn fail(&mut self, e: FrameError) -> FrameError {
        let code = match e {
            FrameError::TooLarge { .. } => CloseCode::FrameTooLarge,
            _ => CloseCode::MalformedFrame,
        };
        warn!(
            peer = %self.conn.peer_id(),
            addr = %self.conn.remote_addr(),
            error = %e,
            "closing connection: {}",
            code.describe()
        );
        self.conn.close(code, &e.to_string());
        self.read.clear();
        e
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde::Deserialize;

    /// A hand-encoded body (as `FrameSender::push_encoded` writes one) gets its length prefix,
    /// or is taken back out whole when it is over the maximum.
    #[test]
    fn a_hand_encoded_frame_is_prefixed_or_removed() {
        let mut buf = b"earlier".to_vec();
        let start = buf.len();
        buf.extend_from_slice(&[0; 4]);
        buf.extend_from_slice(b"body");
        finish_frame(&mut buf, start, 4).expect("fits");
        assert_eq!(&buf[start..], b"\x04\0\0\0body");

        let start = buf.len();
        buf.extend_from_slice(&[0; 4]);
        buf.extend_from_slice(b"five!");
        let err = finish_frame(&mut buf, start, 4).expect_err("over the maximum");
        assert!(
            matches!(err, FrameError::TooLarge { len: 5, max: 4 }),
            "{err}"
        );
        assert_eq!(buf, b"earlier\x04\0\0\0body", "the refused frame is gone");
    }

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    struct Inner {
        id: u128,
        tags: Vec<String>,
        opt: Option<i32>,
    }

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    enum Sample {
        A { x: u64, s: String },
        B(Vec<u8>),
        C,
        D(Inner, bool, f64),
        E(Vec<Sample>),
    }

    fn inner() -> impl Strategy<Value = Inner> {
        (
            any::<u128>(),
            proptest::collection::vec(".{0,12}", 0..4),
            any::<Option<i32>>(),
        )
            .prop_map(|(id, tags, opt)| Inner { id, tags, opt })
    }

    fn sample() -> impl Strategy<Value = Sample> {
        let leaf = prop_oneof![
            (any::<u64>(), ".{0,40}").prop_map(|(x, s)| Sample::A { x, s }),
            proptest::collection::vec(any::<u8>(), 0..300).prop_map(Sample::B),
            Just(Sample::C),
            // Finite floats only: NaN != NaN would fail the equality, not the codec.
            (inner(), any::<bool>(), -1e300f64..1e300).prop_map(|(i, b, f)| Sample::D(i, b, f)),
        ];
        leaf.prop_recursive(3, 32, 4, |s| {
            proptest::collection::vec(s, 0..4).prop_map(Sample::E)
        })
    }

    /// Feeds `stream` to a [`Reassembly`] cut at `cuts` (sorted offsets) and returns the
    /// bodies it gave, each with whether it is a slice of its chunk (not a copy).
    fn reassemble(stream: &Bytes, cuts: &[usize], max: usize) -> Vec<(Bytes, bool)> {
        let mut read = Reassembly::new();
        let mut bodies = Vec::new();
        let mut from = 0;
        for &to in cuts.iter().chain([&stream.len()]) {
            let chunk = stream.slice(from..to);
            let range = chunk.as_ptr_range();
            read.push(chunk);
            while let Some(body) = read.next_body(max).expect("under the maximum") {
                let p = body.as_ptr_range();
                let shared = range.start <= p.start && p.end <= range.end;
                bodies.push((body, shared));
            }
            from = to;
        }
        assert_eq!(read.len(), 0, "bytes left over");
        bodies
    }

    /// A frame whose prefix says more than the maximum is refused as soon as the prefix is
    /// whole, even when a chunk cut the prefix itself.
    #[test]
    fn reassembly_refuses_an_oversized_frame_from_its_prefix() {
        let stream = [&100u32.to_le_bytes()[..], &[7; 10]].concat();
        for cut in 1..4 {
            let mut read = Reassembly::new();
            read.push(Bytes::copy_from_slice(&stream[..cut]));
            assert!(read.next_body(64).expect("prefix not whole yet").is_none());
            read.push(Bytes::copy_from_slice(&stream[cut..]));
            let err = read.next_body(64).expect_err("over the maximum");
            assert!(
                matches!(err, FrameError::TooLarge { len: 100, max: 64 }),
                "{err}"
            );
        }
    }

    proptest! {
        /// Frames come out whole and in order wherever the chunks are cut (inside a prefix,
        /// inside a body, between frames), and a frame inside one chunk is not copied.
        #[test]
        fn reassembly_gives_every_frame_wherever_chunks_are_cut(
            bodies in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..600), 1..12),
            cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..10),
        ) {
            let mut out = Vec::new();
            let mut starts = Vec::new();
            for b in &bodies {
                starts.push(out.len());
                let start = out.len();
                out.extend_from_slice(&[0; 4]);
                out.extend_from_slice(b);
                finish_frame(&mut out, start, 1 << 20).expect("fits");
            }
            let stream = Bytes::from(out);
            let mut cuts: Vec<usize> = cuts.iter().map(|i| i.index(stream.len())).collect();
            cuts.sort_unstable();
            cuts.dedup();
            let got = reassemble(&stream, &cuts, 1 << 20);
            prop_assert_eq!(got.len(), bodies.len());
            for (i, ((body, shared), want)) in got.iter().zip(&bodies).enumerate() {
                prop_assert_eq!(&body[..], &want[..]);
                let (start, end) = (starts[i], starts[i] + 4 + want.len());
                let cut_inside = cuts.iter().any(|&c| start < c && c < end);
                prop_assert_eq!(*shared, !cut_inside, "frame {} copied: {}", i, !shared);
            }
        }

        #[test]
        fn frames_round_trip(frames in proptest::collection::vec(sample(), 1..8)) {
            let mut out = Vec::new();
            for f in &frames {
                encode_frame(f, &mut out, 1 << 20).expect("encode");
            }
            let mut at = 0;
            for f in &frames {
                let (back, used) = decode_frame::<Sample>(&out[at..], 1 << 20)
                    .expect("decode")
                    .expect("whole");
                prop_assert_eq!(&back, f);
                at += used;
            }
            prop_assert_eq!(at, out.len());
            // Every strict prefix is "not yet", never an error or a panic.
            let mut one = Vec::new();
            encode_frame(&frames[0], &mut one, 1 << 20).expect("encode");
            for cut in 0..one.len() {
                prop_assert!(decode_frame::<Sample>(&one[..cut], 1 << 20).expect("prefix").is_none());
            }
        }

        #[test]
        fn garbage_never_panics(
            bytes in proptest::collection::vec(any::<u8>(), 0..1024),
            max in 0usize..2048,
        ) {
            let _ = decode_frame::<Sample>(&bytes, max);
            let _ = decode_frame::<(String, Vec<u64>, Option<char>)>(&bytes, max);
            let _ = decode_frame::<std::collections::BTreeMap<String, Vec<u8>>>(&bytes, max);
        }

        #[test]
        fn garbage_bodies_with_valid_lengths_never_panic(
            body in proptest::collection::vec(any::<u8>(), 0..512),
        ) {
            let mut buf = (body.len() as u32).to_le_bytes().to_vec();
            buf.extend_from_slice(&body);
            match decode_frame::<Sample>(&buf, 1024) {
                Ok(Some((_, used))) => prop_assert_eq!(used, buf.len()),
                Ok(None) => prop_assert!(false, "a whole frame is never \"not yet\""),
                Err(e) => prop_assert!(matches!(e, FrameError::Malformed(_)), "{e:?}"),
            }
        }
    }

    #[test]
    fn oversized_is_refused_before_allocating() {
        let mut buf = (u32::MAX).to_le_bytes().to_vec();
        buf.extend_from_slice(&[0; 16]);
        assert!(matches!(
            decode_frame::<Sample>(&buf, 1024),
            Err(FrameError::TooLarge { .. })
        ));
        let mut out = Vec::new();
        let big = Sample::B(vec![0; 2048]);
        assert!(matches!(
            encode_frame(&big, &mut out, 1024),
            Err(FrameError::TooLarge { .. })
        ));
        assert!(out.is_empty(), "a refused frame leaves nothing behind");
    }

    #[test]
    fn hostile_inner_length_is_malformed_not_an_allocation() {
        // A Vec<u8> claiming 2^60 elements inside a small frame.
        let body = [252u8, 0, 0, 0, 0, 0, 0, 0, 16];
        let mut buf = (body.len() as u32 + 1).to_le_bytes().to_vec();
        buf.push(1); // variant B
        buf.extend_from_slice(&body);
        assert!(matches!(
            decode_frame::<Sample>(&buf, 1024),
            Err(FrameError::Malformed(_))
        ));
    }
}
