//! The messages of `send` and `pub`: rendered from the PAYLOAD template or read from stdin
//! line by line as it arrives, handed to the node in calls of up to `--batch` messages, with
//! their acknowledgements awaited while later calls go out.
//!
//! Every buffer here is bounded: stdin is read ahead by at most [`STDIN_CHUNKS_AHEAD`] chunks
//! (each at most `--batch` lines and [`STDIN_CHUNK_BYTES`], plus one line), a line is at most
//! [`STDIN_MAX_LINE`] bytes, and at most [`MAX_UNACKED`] copies ([`MAX_UNACKED_BYTES`]) wait for
//! their acknowledgement before the next call waits for one of them. Reading stdin ends at its end,
//! at the first message not delivered in time, or at Ctrl-C / SIGTERM ([`watch_signals`]).

use std::collections::VecDeque;
use std::io::{BufRead as _, BufReader, Read};
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow, bail};
use futures_util::StreamExt as _;
use futures_util::future::BoxFuture;
use futures_util::stream::FuturesUnordered;
use peerbus::{DeliveryError, MAX_BATCH_BYTES, Node, Outgoing, Receipt};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::commands::{BatchArgs, HeaderArgs};
use crate::common::{UsageError, shutdown_signal};
use crate::template::Template;

/// The longest line of stdin `send -`/`pub -` take: the bytes one `send_batch` call may hold.
/// A longer line ends the run with an error naming it (the lines before it were sent).
const STDIN_MAX_LINE: usize = MAX_BATCH_BYTES;
/// The reader hands stdin over in chunks of at most `--batch` lines and this many bytes (or
/// one longer line); it hands a chunk over at once when stdin has nothing more ready, so a
/// slow producer's lines go out as they come.
const STDIN_CHUNK_BYTES: usize = 1024 * 1024;
/// Chunks of stdin read ahead of the calls that send them.
const STDIN_CHUNKS_AHEAD: usize = 4;
/// Copies (and calls) handed to the node whose acknowledgement is awaited at once: past it,
/// the next call first waits for one of them.
const MAX_UNACKED: usize = 65_536;
/// Bytes (as [`Outgoing::size`] counts them) of the calls whose acknowledgement is awaited at
/// once: past it, too, the next call first waits. The node keeps what it has not delivered in
/// memory (or its data directory), so this bounds that as well.
const MAX_UNACKED_BYTES: usize = 64 * 1024 * 1024;

/// Where `send`/`pub` put their messages.
#[derive(Clone, Copy)]
pub(crate) enum Dest<'a> {
    Service(&'a str),
    Topic(&'a str),
}

/// Where the payloads come from.
enum Source {
    /// The PAYLOAD argument, rendered for each index below `count`.
    Template { payload: Template, count: u64 },
    /// The lines of stdin (PAYLOAD `-`), as a thread reads them, and those of a chunk not yet
    /// taken.
    Stdin {
        chunks: mpsc::Receiver<Result<Vec<String>, String>>,
        lines: VecDeque<String>,
        /// Set by the first Ctrl-C or SIGTERM ([`watch_signals`]): no more lines are taken.
        interrupted: watch::Receiver<bool>,
    },
}

impl Source {
    /// Whether stdin ended and every line of it was taken (the reader thread is done and
    /// nothing it sent is left).
    fn stdin_ended(&self) -> bool {
        match self {
            Source::Stdin { chunks, lines, .. } => {
                chunks.is_closed() && chunks.is_empty() && lines.is_empty()
            }
            Source::Template { .. } => false,
        }
    }
}

/// The messages `send`/`pub` produce, and how.
pub(crate) struct Batch {
    source: Source,
    key: Option<Template>,
    /// Messages per call (`--batch`).
    per_call: usize,
    /// How long each message may take to be stored, and then to be acknowledged.
    pub(crate) timeout: Duration,
    /// `--header`s, on every message.
    headers: HeaderArgs,
}

/// What a run handed over and what came of it.
pub(crate) struct Outcome {
    /// A signal stopped the reading of stdin before it ended.
    pub(crate) interrupted: bool,
    /// Messages handed to the node.
    pub(crate) messages: u64,
    /// Copies stored: one per message for `send`, one per subscriber group for `pub`.
    pub(crate) copies: u64,
    /// From the first call to the last acknowledgement (or the last call, without waiting).
    pub(crate) elapsed: Duration,
}

impl Outcome {
    /// What the summary adds when a signal cut stdin short.
    pub(crate) fn cut_short(&self) -> &'static str {
        if self.interrupted {
            " (stopped by a signal before stdin ended)"
        } else {
            ""
        }
    }
}

impl Batch {
    /// Checks the arguments; for PAYLOAD `-`, starts the thread that reads stdin.
    pub(crate) fn new(args: &BatchArgs) -> Result<Self> {
        let stdin = args.payload == "-";
        if stdin && args.count.is_some() {
            bail!(UsageError(
                "--count does not go with PAYLOAD `-`: each line of stdin is one message".into()
            ));
        }
        // Placeholders mean something only when there are many messages.
        let template = |text: &str| {
            if args.count.is_some() || stdin {
                Template::parse(text).map_err(|e| anyhow!(UsageError(e)))
            } else {
                Ok(Template::verbatim(text))
            }
        };
        let key = args.key.as_deref().map(template).transpose()?;
        // At most MAX_BATCH (clap checks it), so it fits.
        let per_call = usize::try_from(args.batch).unwrap_or(peerbus::MAX_BATCH);
        let source = if stdin {
            let (tx, chunks) = mpsc::channel(STDIN_CHUNKS_AHEAD);
            std::thread::Builder::new()
                .name("stdin".into())
                .spawn(move || read_chunks(std::io::stdin(), per_call, STDIN_MAX_LINE, &tx))
                .context("could not start the thread that reads stdin")?;
            Source::Stdin {
                chunks,
                lines: VecDeque::new(),
                interrupted: watch_signals(),
            }
        } else {
            Source::Template {
                payload: template(&args.payload)?,
                count: args.count.unwrap_or(1),
            }
        };
        Ok(Self {
            source,
            key,
            per_call,
            timeout: args.timeout,
            headers: args.headers.clone(),
        })
    }

    /// Hands every message to `node` in order, [`Self::per_call`] at a time (a single message
    /// with `send`/`publish`, more with `send_batch`/`publish_batch`, never more than
    /// [`MAX_BATCH_BYTES`] a call), each call stored within the timeout. With `wait`, each
    /// copy must also be acknowledged within the timeout once stored; the first that is not
    /// stops the run (no later message is handed over), and the error counts what became of
    /// the rest. `to` names the destination in that error.
    pub(crate) async fn run(
        mut self,
        node: &Node,
        dest: Dest<'_>,
        wait: bool,
        to: &str,
    ) -> Result<Outcome> {
        let mut acks = Acks::default();
        let (mut messages, mut copies) = (0u64, 0u64);
        let mut held: Option<Outgoing> = None;
        let mut start = None;
        loop {
            if acks.failed() {
                break;
            }
            // A call's first message: wait for it, taking acknowledgements meanwhile.
            let first = match held.take() {
                Some(m) => m,
                None => match self.next(messages, &mut acks).await {
                    Ok(Some(m)) => m,
                    Ok(None) => break,
                    Err(e) => {
                        acks.settle_all().await;
                        let acked = if wait {
                            format!(", {} of {copies} acknowledged", acks.acked)
                        } else {
                            String::new()
                        };
                        bail!(
                            "{e}: stopped there ({} before it sent{acked})",
                            counted_messages(messages)
                        );
                    }
                },
            };
            let mut bytes = first.size();
            let mut call = vec![first];
            while call.len() < self.per_call {
                let Some(m) = self.ready(messages + call.len() as u64) else {
                    break;
                };
                if bytes + m.size() > MAX_BATCH_BYTES {
                    held = Some(m);
                    break;
                }
                bytes += m.size();
                call.push(m);
            }
            let n = call.len() as u64;
            start.get_or_insert_with(Instant::now);
            let deadline = Instant::now() + self.timeout;
            let receipt = self.submit(node, dest, call, messages, deadline).await?;
            messages += n;
            copies += receipt.copies() as u64;
            if wait {
                acks.push(receipt, bytes, Instant::now() + self.timeout);
                while acks.waiting > MAX_UNACKED
                    || acks.pending.len() > MAX_UNACKED
                    || acks.waiting_bytes > MAX_UNACKED_BYTES
                {
                    acks.settle_one().await;
                }
            }
        }
        acks.settle_all().await;
        if messages == 0 && matches!(self.source, Source::Stdin { .. }) {
            bail!(UsageError("stdin held no line to send".into()));
        }
        let elapsed = start.map_or(Duration::ZERO, |s| s.elapsed());
        if wait && acks.acked < copies {
            // What the first failure left unsent.
            let unsent = match &self.source {
                Source::Template { count, .. } if *count > messages => format!(
                    "; stopped there: {} more not sent",
                    counted_messages(count - messages)
                ),
                Source::Stdin { .. } if !self.source.stdin_ended() => {
                    "; stopped there: the rest of stdin was not read".to_string()
                }
                Source::Template { .. } | Source::Stdin { .. } => String::new(),
            };
            return Err(acks.error(copies, to, self.timeout, &unsent));
        }
        let interrupted = match &self.source {
            Source::Stdin { interrupted, .. } => {
                *interrupted.borrow() && !self.source.stdin_ended()
            }
            Source::Template { .. } => false,
        };
        Ok(Outcome {
            interrupted,
            messages,
            copies,
            elapsed,
        })
    }

    /// The message at `index`: waits for it (a line of stdin), taking acknowledgements while
    /// it waits; `None` once there is none left.
    async fn next(&mut self, index: u64, acks: &mut Acks) -> Result<Option<Outgoing>> {
        loop {
            let payload = match &mut self.source {
                Source::Template { payload, count } => {
                    if index >= *count {
                        return Ok(None);
                    }
                    payload.render(index)
                }
                Source::Stdin {
                    chunks,
                    lines,
                    interrupted,
                } => {
                    if *interrupted.borrow() {
                        return Ok(None);
                    }
                    if let Some(line) = lines.pop_front() {
                        line
                    } else {
                        tokio::select! {
                            chunk = chunks.recv() => match chunk {
                                Some(Ok(more)) => {
                                    lines.extend(more);
                                    continue;
                                }
                                Some(Err(e)) => bail!(e),
                                None => return Ok(None),
                            },
                            // The first failure ends the run, however much stdin is to come.
                            () = acks.settle_one(), if !acks.pending.is_empty() => {
                                if acks.failed() {
                                    return Ok(None);
                                }
                                continue;
                            }
                            // So does a signal: what was handed over is still acknowledged.
                            _ = interrupted.wait_for(|stop| *stop) => return Ok(None),
                        }
                    }
                }
            };
            return Ok(Some(self.message(index, payload)));
        }
    }

    /// The message at `index` if it is ready now: a template's, or a line of stdin already
    /// read. A reading error is left for [`Self::next`] to report.
    fn ready(&mut self, index: u64) -> Option<Outgoing> {
        let payload = match &mut self.source {
            Source::Template { payload, count } => (index < *count).then(|| payload.render(index)),
            Source::Stdin { chunks, lines, .. } => {
                if lines.is_empty()
                    && let Ok(Ok(more)) = chunks.try_recv()
                {
                    lines.extend(more);
                }
                lines.pop_front()
            }
        }?;
        Some(self.message(index, payload))
    }

    /// Hands one call's messages (from index `first`) to the node by `deadline`.
    async fn submit(
        &self,
        node: &Node,
        dest: Dest<'_>,
        mut call: Vec<Outgoing>,
        first: u64,
        deadline: Instant,
    ) -> Result<Receipt> {
        let n = call.len() as u64;
        let handed = async {
            match (dest, call.len()) {
                (Dest::Service(s), 1) => node.send(s, call.remove(0)).await,
                (Dest::Topic(t), 1) => node.publish(t, call.remove(0)).await,
                (Dest::Service(s), _) => node.send_batch(s, call).await,
                (Dest::Topic(t), _) => node.publish_batch(t, call).await,
            }
        };
        // Named only when a call fails.
        let which = || {
            if n == 1 {
                format!("message {first}")
            } else {
                format!("messages {first}..{}", first + n - 1)
            }
        };
        let result = tokio::time::timeout_at(deadline, handed)
            .await
            .map_err(|_| {
                anyhow!(
                    "timed out after {} storing {}",
                    humantime::format_duration(self.timeout),
                    which()
                )
            })?;
        result.with_context(|| match dest {
            Dest::Service(s) => format!("could not send {} to `{s}`", which()),
            Dest::Topic(t) => format!("could not publish {} on `{t}`", which()),
        })
    }

    fn message(&self, index: u64, payload: String) -> Outgoing {
        let msg = self.headers.apply(Outgoing::new(payload));
        match &self.key {
            Some(k) => msg.key(k.render(index)),
            None => msg,
        }
    }
}

fn counted_messages(n: u64) -> String {
    crate::output::counted(n, "message", "messages")
}

/// A receipt's copies, its call's bytes, and what became of the copies by its deadline
/// (`None`: not acknowledged).
type Settled = BoxFuture<'static, (u64, usize, Option<Result<(), DeliveryError>>)>;

/// The acknowledgements awaited: each receipt with its deadline, and what came of those
/// already taken.
#[derive(Default)]
struct Acks {
    pending: FuturesUnordered<Settled>,
    /// Copies in `pending`.
    waiting: usize,
    /// Bytes of the calls in `pending`.
    waiting_bytes: usize,
    acked: u64,
    /// Copies that could not be delivered, and the first reason.
    failed: u64,
    first_error: Option<DeliveryError>,
    /// Copies not acknowledged by their deadline.
    late: u64,
}

impl Acks {
    /// Awaits the acknowledgement of a call of `bytes` by `deadline`.
    fn push(&mut self, receipt: Receipt, bytes: usize, deadline: Instant) {
        let copies = receipt.copies();
        self.waiting += copies;
        self.waiting_bytes += bytes;
        self.pending.push(Box::pin(async move {
            let outcome = tokio::time::timeout_at(deadline, receipt.acked()).await;
            (copies as u64, bytes, outcome.ok())
        }));
    }

    /// Waits for one receipt's outcome (none if nothing is awaited). Cancel-safe: a receipt
    /// stays in `pending` until its outcome is taken.
    async fn settle_one(&mut self) {
        let Some((copies, bytes, outcome)) = self.pending.next().await else {
            return;
        };
        self.waiting -= copies as usize;
        self.waiting_bytes -= bytes;
        match outcome {
            Some(Ok(())) => self.acked += copies,
            Some(Err(e)) => {
                self.failed += copies;
                self.first_error.get_or_insert(e);
            }
            None => self.late += copies,
        }
    }

    async fn settle_all(&mut self) {
        while !self.pending.is_empty() {
            self.settle_one().await;
        }
    }

    fn failed(&self) -> bool {
        self.failed > 0 || self.late > 0
    }

    /// Says how many of `copies` were acknowledged and what became of the others.
    fn error(&self, copies: u64, to: &str, timeout: Duration, unsent: &str) -> anyhow::Error {
        let mut msg = format!(
            "{} of {copies} messages to {to} acknowledged within {} each",
            self.acked,
            humantime::format_duration(timeout)
        );
        if let Some(e) = &self.first_error {
            msg.push_str(&format!("; {} not delivered (first: {e})", self.failed));
        }
        if self.late > 0 {
            msg.push_str(&format!("; {} still unacknowledged", self.late));
        }
        msg.push_str(unsent);
        anyhow!(msg)
    }
}

/// Watches for Ctrl-C and SIGTERM while `send -`/`pub -` read stdin: the first stops the
/// reading (what was handed over is still acknowledged, and the summary printed), a second
/// ends the process at once (exit code 130).
fn watch_signals() -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        if shutdown_signal().await.is_err() {
            return;
        }
        let _ = tx.send(true);
        eprintln!(
            "stopping: no more of stdin is read; waiting for what was sent to be acknowledged \
             (again to exit at once)"
        );
        if shutdown_signal().await.is_ok() {
            eprintln!("interrupted again: exiting without waiting for acknowledgements");
            std::process::exit(130);
        }
    });
    rx
}

/// Reads the lines of `input` (without their `\n` or `\r\n`) into `chunks`: at most
/// `per_chunk` lines and [`STDIN_CHUNK_BYTES`] a chunk (or one longer line), each handed over
/// once full or once `input` has nothing more buffered (the next read may wait for the
/// producer). Ends at the end of `input` or once the receiver is gone; a line over `max_line`
/// bytes, a line that is not UTF-8 or a failed read is sent as an error (after the lines before
/// it) and ends it.
fn read_chunks(
    input: impl Read,
    per_chunk: usize,
    max_line: usize,
    chunks: &mpsc::Sender<Result<Vec<String>, String>>,
) {
    let mut reader = BufReader::with_capacity(64 * 1024, input);
    let (mut chunk, mut bytes, mut buf, mut number) = (Vec::new(), 0, Vec::new(), 0usize);
    let result = loop {
        buf.clear();
        // Never more than a line's bound (and its line end) in memory.
        let read = (&mut reader)
            .take(max_line as u64 + 2)
            .read_until(b'\n', &mut buf);
        match read {
            Ok(0) => break Ok(()),
            Ok(_) => {}
            Err(e) => break Err(format!("could not read stdin: {e}")),
        }
        number += 1;
        let line = buf.strip_suffix(b"\n").unwrap_or(&buf);
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.len() > max_line {
            break Err(format!(
                "line {number} of stdin is longer than {max_line} bytes"
            ));
        }
        let Ok(line) = std::str::from_utf8(line) else {
            break Err(format!("line {number} of stdin is not UTF-8 text"));
        };
        bytes += line.len();
        chunk.push(line.to_string());
        if chunk.len() >= per_chunk || bytes >= STDIN_CHUNK_BYTES || reader.buffer().is_empty() {
            if chunks
                .blocking_send(Ok(std::mem::take(&mut chunk)))
                .is_err()
            {
                return;
            }
            bytes = 0;
        }
    };
    if !chunk.is_empty() && chunks.blocking_send(Ok(chunk)).is_err() {
        return;
    }
    if let Err(e) = result {
        let _ = chunks.blocking_send(Err(e));
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use tokio::sync::mpsc;

    use super::read_chunks;

    /// The chunks `read_chunks` makes of `input`, read on a thread of its own.
    fn chunks(
        input: impl Read + Send + 'static,
        per_chunk: usize,
        max_line: usize,
    ) -> Vec<Result<Vec<String>, String>> {
        let (tx, mut rx) = mpsc::channel(1);
        let reader = std::thread::spawn(move || read_chunks(input, per_chunk, max_line, &tx));
        let mut out = Vec::new();
        while let Some(c) = rx.blocking_recv() {
            out.push(c);
        }
        reader.join().expect("reader thread");
        out
    }

    fn lines(v: &[&str]) -> Result<Vec<String>, String> {
        Ok(v.iter().map(|s| s.to_string()).collect())
    }

    #[test]
    fn stdin_lines_lose_their_line_ends_and_come_in_chunks_of_a_call() {
        let read = |text: &'static str, per_chunk| chunks(text.as_bytes(), per_chunk, 100);
        assert_eq!(
            read("a\r\n\nb c\nlast", 3),
            [lines(&["a", "", "b c"]), lines(&["last"])]
        );
        assert_eq!(read("", 3), []);
        assert_eq!(read("1\n2\n", 1), [lines(&["1"]), lines(&["2"])]);
    }

    #[test]
    fn a_bad_line_comes_after_the_lines_before_it_and_ends_the_reading() {
        let out = chunks(&b"ok\n\xff\nnever\n"[..], 10, 100);
        assert_eq!(out[0], lines(&["ok"]));
        assert_eq!(out[1], Err("line 2 of stdin is not UTF-8 text".into()));
        assert_eq!(out.len(), 2);
        // A line of the bound passes, with either line end; one byte more does not.
        let out = chunks(&b"12345\r\n1234\n123456\n"[..], 10, 5);
        assert_eq!(out[0], lines(&["12345", "1234"]));
        assert_eq!(out[1], Err("line 3 of stdin is longer than 5 bytes".into()));
    }

    /// Hands out `parts` one per read, as a pipe does when its writer writes them apart.
    struct Trickle(Vec<&'static [u8]>);

    impl Read for Trickle {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            if self.0.is_empty() {
                return Ok(0);
            }
            let part = self.0.remove(0);
            buf[..part.len()].copy_from_slice(part);
            Ok(part.len())
        }
    }

    #[test]
    fn lines_go_out_once_stdin_has_nothing_more_ready() {
        // Each read brings what a producer wrote at once: a chunk ends with it, however
        // many lines a call could hold, so no line waits for the next write.
        let out = chunks(Trickle(vec![b"a\nb\n", b"c\n", b"d"]), 100, 100);
        assert_eq!(out, [lines(&["a", "b"]), lines(&["c"]), lines(&["d"])]);
    }
}
