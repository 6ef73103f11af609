//! Journals: what a chaos worker sent and what its handlers processed, one JSON object per
//! line in `<data_dir>/journal.jsonl`.
//!
//! Each line is written with one `write` call on a file opened for appending, before the
//! action it records is acknowledged, so a SIGKILL'd worker keeps every line it wrote (the
//! page cache survives the process; no fsync is needed for that). A torn last line is
//! counted and skipped by the reader.

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::Path;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// File name of a worker's journal inside its data directory.
pub(crate) const JOURNAL: &str = "journal.jsonl";

/// Microseconds on the system's monotonic clock (`CLOCK_MONOTONIC`), the time line of a run:
/// journal lines, fault windows and the sampler's seconds are all on it.
///
/// Every process of a run reads the same clock (on Linux it is system-wide), and unlike the
/// wall clock it never steps: a step of the wall clock during a run (NTP, a virtual machine
/// resumed after a pause, which steps it by the length of the pause) would shift the
/// journal lines written after it against those written before. Handlings on different
/// nodes are ordered by these stamps when the checker looks for order violations, and fault
/// windows are matched against them.
pub(crate) fn now_us() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `clock_gettime` writes a `timespec` into the pointer it is given, which points
    // to a live one; CLOCK_MONOTONIC is always a valid clock on Linux.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    if rc != 0 {
        return 0;
    }
    ts.tv_sec.max(0) as u64 * 1_000_000 + ts.tv_nsec.max(0) as u64 / 1_000
}

/// Microseconds since the Unix epoch now (the wall clock).
pub(crate) fn unix_now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// The payload of every chaos message: enough to check it without the journal of its sender.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct Payload {
    /// Origin worker index.
    pub(crate) o: usize,
    /// Per-origin sequence (continues across restarts).
    pub(crate) g: u64,
    /// Destination (service or topic).
    pub(crate) d: String,
    /// Partition key.
    pub(crate) k: String,
    /// Per-(origin, destination, key) sequence.
    pub(crate) n: u64,
}

/// One journal line.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "ev", rename_all = "snake_case")]
pub(crate) enum Event {
    /// A worker (re)started.
    Start { t: u64, node: usize, pid: u32 },
    /// About to call `send`/`publish`.
    Intent {
        t: u64,
        #[serde(flatten)]
        p: Payload,
        publish: bool,
    },
    /// `send`/`publish` returned Ok: the message is acknowledged (durable).
    Accepted {
        t: u64,
        o: usize,
        g: u64,
        copies: usize,
    },
    /// `send`/`publish` returned an error: not acknowledged.
    Failed {
        t: u64,
        o: usize,
        g: u64,
        err: String,
    },
    /// A handler processed a message, as consumer `c` (`svc:<service>` or `grp:<group>`).
    Handled {
        t: u64,
        #[serde(flatten)]
        p: Payload,
        by: usize,
        c: String,
    },
    /// About to call `request`: request `r` of the worker process of node `o` that started
    /// at `run` (µs, the journals' clock), to service `svc`, with a timeout of `timeout_ms`.
    RequestBegun {
        t: u64,
        o: usize,
        run: u64,
        r: u64,
        svc: String,
        timeout_ms: u64,
    },
    /// A `request` to service `svc` ended after `ms` milliseconds: `outcome` is `ok` or the
    /// error's kind (`timeout`, `peer_lost`, …); `wrong` says an `ok` reply was not the echo
    /// of request `r` of worker `o` (a reply delivered to the wrong caller). `run` names the
    /// worker process, as in [`Event::RequestBegun`].
    Request {
        t: u64,
        o: usize,
        #[serde(default)]
        run: u64,
        r: u64,
        svc: String,
        outcome: String,
        ms: u64,
        wrong: bool,
    },
    /// The worker's node closed connections since its last `closes` line (of this process),
    /// by close code name: only the codes whose count grew, with the growth. Sampled every
    /// 100 ms tick of the worker, so a SIGKILL loses at most the last tick's closes.
    Closes {
        t: u64,
        node: usize,
        codes: BTreeMap<String, u64>,
    },
    /// The worker's node's recovery counters grew since its last `counts` line (of this
    /// process): entries it sent again (after a nack, an ack timeout, a lost peer) and copies
    /// its dedup window dropped. Sampled like `closes`.
    Counts {
        t: u64,
        node: usize,
        /// Growth of [`peerbus::DeliveryCounts::redelivered`].
        redelivered: u64,
        /// Growth of [`peerbus::DeliveryCounts::duplicates_dropped`].
        duplicates_dropped: u64,
    },
}

/// An append-only journal shared by a worker's tasks.
#[derive(Debug)]
pub(crate) struct Journal {
    file: Mutex<File>,
}

impl Journal {
    /// Opens (creating) the journal of the worker whose data directory is `dir`.
    pub(crate) fn open(dir: &Path) -> io::Result<Journal> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(JOURNAL))?;
        Ok(Journal {
            file: Mutex::new(file),
        })
    }

    /// Appends one event as one line, in one `write`.
    pub(crate) fn write(&self, ev: &Event) -> io::Result<()> {
        let mut line = serde_json::to_vec(ev).map_err(io::Error::other)?;
        line.push(b'\n');
        let mut f = self
            .file
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f.write_all(&line)
    }
}

/// Every event of a journal file, and how many lines could not be read (a torn last line
/// after a SIGKILL). A missing file reads as empty.
pub(crate) fn read(path: &Path) -> io::Result<(Vec<Event>, usize)> {
    let mut text = String::new();
    match File::open(path) {
        Ok(mut f) => {
            f.read_to_string(&mut text)?;
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((Vec::new(), 0)),
        Err(e) => return Err(e),
    }
    let mut events = Vec::new();
    let mut bad = 0;
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        match serde_json::from_str::<Event>(line) {
            Ok(e) => events.push(e),
            Err(_) => bad += 1,
        }
    }
    Ok((events, bad))
}

/// Where a restarted worker resumes: the next per-origin sequence and the next sequence of
/// each (destination, key), after everything its journal shows it intended before.
#[derive(Debug, Default)]
pub(crate) struct Resume {
    /// Next per-origin sequence.
    pub(crate) next_g: u64,
    /// Next per-(destination, key) sequence.
    pub(crate) next_n: HashMap<(String, String), u64>,
}

/// Reads a worker's own journal to find where it resumes.
pub(crate) fn resume(dir: &Path, me: usize) -> io::Result<Resume> {
    let (events, _) = read(&dir.join(JOURNAL))?;
    let mut r = Resume::default();
    for e in events {
        if let Event::Intent { p, .. } = e
            && p.o == me
        {
            r.next_g = r.next_g.max(p.g + 1);
            let n = r.next_n.entry((p.d, p.k)).or_default();
            *n = (*n).max(p.n + 1);
        }
    }
    Ok(r)
}

/// Follows journal files as they grow, counting acknowledged sends and handled messages for
/// the progress lines (the checker reads the files whole at the end).
#[derive(Debug, Default)]
pub(crate) struct Tail {
    offsets: HashMap<std::path::PathBuf, u64>,
    /// `accepted` lines seen.
    pub(crate) accepted: u64,
    /// `handled` lines seen.
    pub(crate) handled: u64,
}

impl Tail {
    /// Reads what was appended to `path` since the last call (whole lines only).
    pub(crate) fn poll(&mut self, path: &Path) {
        use std::io::{Seek, SeekFrom};
        let Ok(mut f) = File::open(path) else { return };
        let off = self.offsets.get(path).copied().unwrap_or(0);
        if f.seek(SeekFrom::Start(off)).is_err() {
            return;
        }
        let mut buf = Vec::new();
        if f.read_to_end(&mut buf).is_err() {
            return;
        }
        let Some(last_nl) = buf.iter().rposition(|&b| b == b'\n') else {
            return;
        };
        for line in buf[..last_nl].split(|&b| b == b'\n') {
            let line = String::from_utf8_lossy(line);
            if line.contains("\"ev\":\"accepted\"") {
                self.accepted += 1;
            } else if line.contains("\"ev\":\"handled\"") {
                self.handled += 1;
            }
        }
        self.offsets
            .insert(path.to_path_buf(), off + last_nl as u64 + 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The run's clock counts microseconds at the pace of `Instant` (the monotonic clock), and
    /// is no Unix time (which a node's logs and the report's Unix stamps use).
    #[test]
    fn the_run_clock_is_the_monotonic_clock_in_microseconds() {
        use std::time::{Duration, Instant};
        // Each reading of the run's clock between two of `Instant`: a preemption between
        // them widens the bounds instead of failing the check.
        let bracket = || {
            let before = Instant::now();
            let t = now_us();
            (before, t, Instant::now())
        };
        let (a0, t0, a1) = bracket();
        std::thread::sleep(Duration::from_millis(50));
        let (b0, t1, b1) = bracket();
        let diff = t1.checked_sub(t0).expect("the run's clock went back");
        let (least, most) = ((b0 - a1).as_micros() as u64, (b1 - a0).as_micros() as u64);
        assert!(
            (least.saturating_sub(1)..=most + 1).contains(&diff),
            "{diff} µs on the run's clock, {least}–{most} µs by Instant"
        );
        // Time since boot, not since 1970: far below the Unix time in µs.
        assert!(now_us() < unix_now_us() / 2);
    }
}
