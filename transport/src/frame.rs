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

/// Decodes the first frame of `buf`: `Ok(None)` when `buf` does not hold a whole frame yet,
/// otherwise the frame and the bytes it used. The length is checked against `max` before
/// anything is allocated.
pub fn decode_frame<T: DeserializeOwned>(
    buf: &[u8],
    max: usize,
) -> Result<Option<(T, usize)>, FrameError> {
    let Some(prefix) = buf.get(..4) else {
        return Ok(None);
    };
    let len = u32::from_le_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]) as usize;
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
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
    buf: Vec<u8>,
    /// Bytes of `buf` already handed to QUIC by an interrupted flush.
    written: usize,
    /// Frame bytes queued ahead of `buf`, oldest first: for each large payload pushed since
    /// the last flush, what `buf` held before it (copied out) and the payload itself (shared,
    /// not copied). Bounded like `buf`: by what the caller pushes between flushes.
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
            written: 0,
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
        let pending = Bytes::copy_from_slice(&self.buf[self.written..]);
        self.buf.clear();
        self.written = 0;
        self.chunked += pending.len() + payload.len();
        self.chunks.push(pending);
        self.chunks.push(payload.clone());
        Ok(())
    }

    /// Bytes waiting for [`FrameSender::flush`].
    pub fn buffered_bytes(&self) -> usize {
        self.chunked + self.buf.len() - self.written
    }

    /// Hands everything buffered to QUIC as one write (one `write` call per congestion or
    /// flow-control wait, as `write_all` does), returning once QUIC has taken it all.
    ///
    /// Cancel-safe: if the future is dropped, the bytes not yet taken stay buffered and the
    /// next flush continues where this one stopped, so no frame is cut or repeated.
    pub async fn flush(&mut self) -> Result<(), FrameError> {
        // The chunks are older than `buf`. QUIC advances a chunk it took in part, in place.
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
        while self.written < self.buf.len() {
            match self.stream.write(&self.buf[self.written..]).await {
                Ok(n) => self.written += n,
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
        self.written = 0;
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
    buf: BytesMut,
    max: usize,
    conn: Connection,
}

impl std::fmt::Debug for FrameReceiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameReceiver")
            .field("peer", &self.conn.peer_id())
            .field("buffered", &self.buf.len())
            .finish_non_exhaustive()
    }
}

impl FrameReceiver {
    pub(crate) fn new(stream: quinn::RecvStream, max: usize, conn: Connection) -> Self {
        Self {
            stream,
            buf: BytesMut::with_capacity(SEND_BUF),
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

    /// Reads one chunk into the buffer: false at a clean end of the stream.
    async fn fill(&mut self) -> Result<bool, FrameError> {
        match self.stream.read_chunk(READ_CHUNK, true).await {
            Ok(Some(chunk)) => {
                self.buf.extend_from_slice(&chunk.bytes);
                Ok(true)
            }
            Ok(None) if self.buf.is_empty() => Ok(false),
            Ok(None) => Err(FrameError::Truncated),
            Err(quinn::ReadError::ConnectionLost(e)) => {
                Err(FrameError::Connection(self.conn.convert(e)))
            }
            Err(e) => Err(FrameError::Connection(ConnectionError::Transport(format!(
                "cannot read the stream: {e}"
            )))),
        }
    }

    /// Takes the body of the first buffered frame out of the buffer, if it is complete.
    fn next_body(&mut self) -> Result<Option<Bytes>, FrameError> {
        let Some(prefix) = self.buf.get(..4) else {
            return Ok(None);
        };
        let len = u32::from_le_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]) as usize;
        if len > self.max {
            return Err(self.fail(FrameError::TooLarge { len, max: self.max }));
        }
        if self.buf.len() < 4 + len {
            return Ok(None);
        }
        let mut frame = self.buf.split_to(4 + len);
        frame.advance(4);
        Ok(Some(frame.freeze()))
    }

    /// The next frame already buffered, without I/O: `Ok(None)` when no complete frame is
    /// buffered. Bad frames are handled as in [`recv`](Self::recv).
    pub fn try_recv_buffered<T: DeserializeOwned>(&mut self) -> Result<Option<T>, FrameError> {
        match decode_frame::<T>(&self.buf, self.max) {
            Ok(Some((v, used))) => {
                self.buf.advance(used);
                Ok(Some(v))
            }
            Ok(None) => Ok(None),
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
        self.buf.clear();
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

    proptest! {
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
