//! The local control socket and offline inspection of a data directory.
//!
//! A node with a data directory listens on `<data_dir>/peerbus.sock` (a Unix
//! socket, mode 0600 by the umask of the process owner; only local users with
//! access to the directory can reach it). The protocol is one JSON object per
//! line in each direction:
//!
//! | request | answer |
//! |---|---|
//! | `{"cmd":"status"}` | `{"ok":true,"status":{…}}` |
//! | `{"cmd":"dlq_list","limit":100}` | `{"ok":true,"dead_letters":[…]}` |
//! | `{"cmd":"dlq_replay","ids":[1,2]}` or `{"cmd":"dlq_replay","all":true}` | `{"ok":true,"replayed":2}` |
//! | `{"cmd":"dlq_move","log":"svc:orders"}` | `{"ok":true,"moved":12}` ([`Node::dead_letter_waiting`]) |
//! | `{"cmd":"entries","limit":100}` | `{"ok":true,"entries":[…]}` (at most [`MAX_ENTRIES_LISTED`]) |
//! | `{"cmd":"faults","partition":["127.0.0.1:7001"],"deaf":["…"],"heal":["…"],"heal_all":true}` | `{"ok":true,"faults":{…}}` |
//! | `{"cmd":"reload"}` | `{"ok":true,"reload":{"ca":"taken","certificate":"unchanged"}}`, or `{"key_file":"taken"}` for a node of a mesh key file ([`Node::reload_mesh_files`]; a refused file is `{"refused":"why"}`) |
//!
//! `faults` only works on a node built with [`NodeBuilder::faults`](crate::NodeBuilder::faults)
//! (`peerbus chaos` does): `partition` drops every datagram to and from those peer listen
//! addresses, `deaf` every datagram from them (a one-way partition: they still hear this
//! node), `heal` ends those partitions, `heal_all` ends all of them (applied first). Every
//! field is optional; the answer lists the fault counters.
//!
//! Errors answer `{"ok":false,"error":"…"}`. Limits: [`MAX_CONTROL_CLIENTS`]
//! connections at once, [`MAX_LINE`] bytes per request line.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Serialize;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Semaphore;
use tracing::{debug, warn};

use crate::engine::outbox::{EntrySnapshot, EntryState, LogStats};
use crate::engine::wire::Envelope;
use crate::node::Node;
use crate::store::{Batch, DeadLetter, RedbStore, Store, StoreError};

/// Most log entries one `entries` request lists (each carries its payload).
pub const MAX_ENTRIES_LISTED: usize = 10_000;

/// File name of the control socket inside the data directory.
pub const SOCKET_NAME: &str = "peerbus.sock";
/// Control connections served at once.
pub const MAX_CONTROL_CLIENTS: usize = 16;
/// Longest request line accepted.
pub const MAX_LINE: usize = 64 * 1024;

/// The control socket path of a data directory.
pub fn socket_path(data_dir: &Path) -> PathBuf {
    data_dir.join(SOCKET_NAME)
}

/// A dead letter as shown by `peerbus dlq list`.
#[derive(Clone, Debug, Serialize)]
pub struct DeadLetterView {
    /// Id to replay it by.
    pub id: u64,
    /// The log it was in (`svc:<service>` / `grp:<group>`).
    pub log: String,
    /// Its sequence number there.
    pub seq: u64,
    /// Service or topic it was addressed to.
    pub destination: String,
    /// Partition key.
    pub key: Option<String>,
    /// Why it was given up.
    pub reason: String,
    /// Attempts made.
    pub attempts: u32,
    /// When it was created (Unix ms).
    pub created_at_ms: u64,
    /// When it was dead-lettered (Unix ms).
    pub dead_at_ms: u64,
    /// Payload as UTF-8 text (lossy).
    pub payload: String,
}

impl From<&DeadLetter> for DeadLetterView {
    fn from(d: &DeadLetter) -> Self {
        Self {
            id: d.id,
            log: d.env.log.to_string(),
            seq: d.env.seq,
            destination: d.env.destination.to_string(),
            key: d.env.key.as_ref().map(|k| k.to_string()),
            reason: d.reason.clone(),
            attempts: d.attempts,
            created_at_ms: d.env.created_at_ms,
            dead_at_ms: d.dead_at_ms,
            payload: String::from_utf8_lossy(&d.env.payload).into_owned(),
        }
    }
}

/// What a stopped node's data directory holds.
#[derive(Clone, Debug, Serialize)]
pub struct OfflineStatus {
    /// The directory.
    pub data_dir: PathBuf,
    /// Per destination log: entries waiting, and the oldest.
    pub logs: BTreeMap<String, LogStats>,
    /// Dead letters stored.
    pub dead_letters: usize,
    /// Corrupt records found (and quarantined) while reading.
    pub corrupt_records: usize,
    /// Durable subscriber groups the node knew of, released ones included (see
    /// [`Status::groups`](crate::Status::groups)).
    pub groups: BTreeMap<String, crate::engine::wire::GroupState>,
}

/// Reads a stopped node's data directory. Fails with [`StoreError::InUse`] when a node runs
/// there (ask it through its control socket instead).
pub fn offline_status(data_dir: &Path) -> Result<OfflineStatus, StoreError> {
    let mut store = RedbStore::open_read_only(data_dir)?;
    let rec = store.recover()?;
    let mut logs: BTreeMap<String, LogStats> = BTreeMap::new();
    for e in &rec.entries {
        let s = logs.entry(e.env.log.to_string()).or_default();
        s.waiting += 1;
        let c = e.env.created_at_ms;
        s.oldest_created_ms = Some(s.oldest_created_ms.map_or(c, |o| o.min(c)));
    }
    Ok(OfflineStatus {
        data_dir: data_dir.to_path_buf(),
        logs,
        dead_letters: rec.dead_letters,
        corrupt_records: rec.corrupt.len(),
        groups: rec.groups.into_iter().collect(),
    })
}

/// One entry a node's log holds: a message no consumer has acknowledged yet, as
/// [`Node::log_entries`] (a running node) and [`offline_entries`] (a stopped one) list it.
#[derive(Clone, Debug, Serialize)]
pub struct LogEntryView {
    /// The log (`svc:<service>`, `grp:<group>`).
    pub log: String,
    /// Sequence number in the log.
    pub seq: u64,
    /// Destination (service or topic).
    pub destination: String,
    /// Partition key.
    pub key: Option<String>,
    /// When it was created (Unix ms).
    pub created_at_ms: u64,
    /// When it expires (Unix ms); `None`: never.
    pub expires_at_ms: Option<u64>,
    /// Not delivered before this time (Unix ms); `None`: at once.
    pub not_before_ms: Option<u64>,
    /// `waiting`, `in_flight` (see `to`) or `staged` (its store commit not done yet) in a
    /// running node; `stored` in a stopped one.
    pub state: &'static str,
    /// The node it is in flight to.
    pub to: Option<String>,
    /// Delivery attempts that failed so far (a nack, an ack timeout); `None` for a stopped
    /// node's entry (its store does not keep the count).
    pub attempts: Option<u32>,
    /// The payload's first [`PAYLOAD_SHOWN`] bytes as UTF-8 text (lossy).
    pub payload: String,
    /// The payload's length in bytes.
    pub payload_bytes: usize,
}

/// How much of each payload a [`LogEntryView`] shows: a listing of 10,000 entries
/// ([`MAX_ENTRIES_LISTED`]) then stays near 10 MB whatever the payloads.
pub const PAYLOAD_SHOWN: usize = 1024;

impl LogEntryView {
    /// The view of an entry of a running node's outbox (`unix` turns its engine times into
    /// Unix ms).
    pub(crate) fn of_entry(e: &EntrySnapshot, unix: impl Fn(u64) -> u64) -> Self {
        let (state, to) = match e.state {
            EntryState::Staged => ("staged", None),
            EntryState::Waiting => ("waiting", None),
            EntryState::InFlight(peer) => ("in_flight", Some(peer.to_string())),
        };
        Self {
            state,
            to,
            attempts: Some(e.attempts),
            expires_at_ms: e.expires_at.map(&unix),
            not_before_ms: (e.not_before > 0).then(|| unix(e.not_before)),
            ..Self::of_envelope(&e.env)
        }
    }

    /// The view of a stored envelope (state `stored`, no times but its creation).
    fn of_envelope(env: &Envelope) -> Self {
        Self {
            log: env.log.to_string(),
            seq: env.seq,
            destination: env.destination.to_string(),
            key: env.key.as_ref().map(|k| k.to_string()),
            created_at_ms: env.created_at_ms,
            expires_at_ms: None,
            not_before_ms: None,
            state: "stored",
            to: None,
            attempts: None,
            payload: String::from_utf8_lossy(&env.payload[..env.payload.len().min(PAYLOAD_SHOWN)])
                .into_owned(),
            payload_bytes: env.payload.len(),
        }
    }
}

/// The entries a stopped node's data directory holds, by log and then sequence number, at
/// most `limit` of them: what it will send once it runs again. Fails with
/// [`StoreError::InUse`] when a node runs there (its log is in its memory; ask its status
/// instead). Reads the whole store to find them, as a start does.
pub fn offline_entries(data_dir: &Path, limit: usize) -> Result<Vec<LogEntryView>, StoreError> {
    let mut store = RedbStore::open_read_only(data_dir)?;
    let rec = store.recover()?;
    Ok(rec
        .entries
        .iter()
        .take(limit)
        .map(|e| LogEntryView {
            expires_at_ms: e.expires_at_ms,
            not_before_ms: e.not_before_ms,
            ..LogEntryView::of_envelope(&e.env)
        })
        .collect())
}

/// Why an entry an operator moved to the dead letters is there ([`Node::dead_letter_waiting`],
/// [`offline_dead_letter_log`]).
pub const MOVED_BY_OPERATOR: &str = "moved to the dead letters by an operator";

/// Moves every entry a stopped node's `log` holds to its dead letters, in one durable commit,
/// as [`Node::dead_letter_waiting`] does for a running node (a stopped node has nothing in
/// flight). Returns how many moved: 0 when no entry of that log is there. Fails with
/// [`StoreError::InUse`] when a node runs there, and on a directory with no store (it makes
/// none).
pub fn offline_dead_letter_log(data_dir: &Path, log: &str) -> Result<usize, StoreError> {
    let mut store = RedbStore::open_existing(data_dir, crate::store::Durability::Fsync)?;
    let rec = store.recover()?;
    let now = crate::message::now_unix_ms();
    let mut batch = Batch::default();
    for e in rec.entries.iter().filter(|e| e.env.log == log) {
        batch.remove.push((e.env.log.clone(), e.env.seq));
        batch.dead.push(DeadLetter {
            id: 0,
            env: Envelope::clone(&e.env),
            reason: MOVED_BY_OPERATOR.to_string(),
            attempts: 0,
            dead_at_ms: now,
        });
    }
    let moved = batch.dead.len();
    if moved > 0 {
        store.commit(batch)?;
        store.sync()?;
    }
    Ok(moved)
}

/// Dead letters in a stopped node's data directory, oldest first.
pub fn offline_dead_letters(
    data_dir: &Path,
    limit: usize,
) -> Result<Vec<DeadLetterView>, StoreError> {
    let mut store = RedbStore::open_read_only(data_dir)?;
    Ok(store
        .dead_letters(limit)?
        .iter()
        .map(DeadLetterView::from)
        .collect())
}

/// Sends one request to a running node's control socket and returns its answer.
pub async fn request(data_dir: &Path, req: &Value) -> std::io::Result<Value> {
    let stream = UnixStream::connect(socket_path(data_dir)).await?;
    let (r, mut w) = stream.into_split();
    let mut line = serde_json::to_vec(req).map_err(std::io::Error::other)?;
    line.push(b'\n');
    w.write_all(&line).await?;
    let mut reader = BufReader::new(r);
    let mut answer = String::new();
    reader.read_line(&mut answer).await?;
    serde_json::from_str(&answer).map_err(std::io::Error::other)
}

/// Serves the control socket until the node stops.
pub(crate) async fn serve(node: Node, data_dir: PathBuf) {
    let path = socket_path(&data_dir);
    // A stale socket from a crashed run: we hold the data directory lock, so it is ours.
    let _ = std::fs::remove_file(&path);
    let listener = match UnixListener::bind(&path) {
        Ok(l) => l,
        Err(e) => {
            warn!(path = %path.display(), error = %e, "control socket unavailable");
            return;
        }
    };
    let permits = Arc::new(Semaphore::new(MAX_CONTROL_CLIENTS));
    let cancel = node.shared.cancel.clone();
    loop {
        let conn = tokio::select! {
            c = listener.accept() => c,
            () = cancel.cancelled() => break,
        };
        let Ok((stream, _)) = conn else { continue };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            debug!("too many control clients");
            continue;
        };
        let node = node.clone();
        node.shared.tracker.clone().spawn(async move {
            let _permit = permit;
            if let Err(e) = client(node, stream).await {
                debug!(error = %e, "control client ended");
            }
        });
    }
    let _ = std::fs::remove_file(&path);
}

async fn client(node: Node, stream: UnixStream) -> std::io::Result<()> {
    let (r, mut w) = stream.into_split();
    let mut reader = BufReader::new(r);
    let mut line = String::new();
    loop {
        line.clear();
        let mut limited = (&mut reader).take(MAX_LINE as u64 + 1);
        let n = tokio::select! {
            n = limited.read_line(&mut line) => n?,
            () = node.shared.cancel.cancelled() => return Ok(()),
        };
        if n == 0 {
            return Ok(());
        }
        let too_long = line.len() > MAX_LINE;
        let answer = if too_long {
            json!({"ok": false, "error": format!("request longer than {MAX_LINE} bytes")})
        } else {
            match serde_json::from_str::<Value>(&line) {
                Ok(req) => answer(&node, &req).await,
                Err(e) => json!({"ok": false, "error": format!("not JSON: {e}")}),
            }
        };
        let mut out = serde_json::to_vec(&answer).map_err(std::io::Error::other)?;
        out.push(b'\n');
        w.write_all(&out).await?;
        if too_long {
            return Ok(());
        }
    }
}

async fn answer(node: &Node, req: &Value) -> Value {
    match req.get("cmd").and_then(Value::as_str) {
        Some("status") => match node.status().await {
            Some(s) => json!({"ok": true, "status": s}),
            None => json!({"ok": false, "error": "node is stopping"}),
        },
        Some("dlq_list") => {
            let limit = req.get("limit").and_then(Value::as_u64).unwrap_or(1000) as usize;
            match node.dead_letters(limit).await {
                Ok(list) => {
                    let views: Vec<DeadLetterView> =
                        list.iter().map(DeadLetterView::from).collect();
                    json!({"ok": true, "dead_letters": views})
                }
                Err(e) => json!({"ok": false, "error": e.to_string()}),
            }
        }
        Some("dlq_replay") => {
            let ids: Option<Vec<u64>> = req
                .get("ids")
                .and_then(Value::as_array)
                .map(|a| a.iter().filter_map(Value::as_u64).collect());
            let all = req.get("all").and_then(Value::as_bool).unwrap_or(false);
            if ids.is_none() && !all {
                return json!({"ok": false, "error": "give `ids` or `all: true`"});
            }
            match node.replay_dead_letters(ids.as_deref()).await {
                Ok(n) => json!({"ok": true, "replayed": n}),
                Err(e) => json!({"ok": false, "error": e.to_string()}),
            }
        }
        Some("dlq_move") => {
            let Some(log) = req.get("log").and_then(Value::as_str) else {
                return json!({"ok": false, "error": "give the `log` to move (`svc:…`, `grp:…`)"});
            };
            match node.dead_letter_waiting(log).await {
                Ok(n) => json!({"ok": true, "moved": n}),
                Err(e) => json!({"ok": false, "error": e.to_string()}),
            }
        }
        Some("entries") => {
            let limit = req.get("limit").and_then(Value::as_u64).unwrap_or(100) as usize;
            match node.log_entries(limit.min(MAX_ENTRIES_LISTED)).await {
                Some(list) => json!({"ok": true, "entries": list}),
                None => json!({"ok": false, "error": "node is stopping"}),
            }
        }
        Some("faults") => faults(node, req),
        Some("reload") => match node.reload_mesh_files().await {
            Ok(reload) => json!({"ok": true, "reload": reload}),
            Err(e) => json!({"ok": false, "error": e.to_string()}),
        },
        Some(other) => json!({"ok": false, "error": format!("unknown command `{other}`")}),
        None => json!({"ok": false, "error": "missing `cmd`"}),
    }
}

/// The `faults` command: partitions (both ways or one way) and heals through the node's fault
/// injector.
fn faults(node: &Node, req: &Value) -> Value {
    let Some(faults) = &node.shared.faults else {
        return json!({"ok": false, "error": "this node runs without fault injection (build it with NodeBuilder::faults)"});
    };
    let addrs = |field: &str| -> Result<Vec<std::net::SocketAddr>, String> {
        match req.get(field) {
            None => Ok(Vec::new()),
            Some(Value::Array(list)) => list
                .iter()
                .map(|v| {
                    v.as_str().and_then(|s| s.parse().ok()).ok_or_else(|| {
                        format!("`{field}` wants socket addresses like \"127.0.0.1:7001\", got {v}")
                    })
                })
                .collect(),
            Some(other) => Err(format!(
                "`{field}` must be a list of socket addresses, got {other}"
            )),
        }
    };
    let (partition, deaf, heal) = match (addrs("partition"), addrs("deaf"), addrs("heal")) {
        (Ok(p), Ok(d), Ok(h)) => (p, d, h),
        (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => {
            return json!({"ok": false, "error": e});
        }
    };
    if req
        .get("heal_all")
        .and_then(Value::as_bool)
        .unwrap_or(false)
    {
        faults.heal_all();
    }
    for a in heal {
        faults.heal(a);
    }
    for a in partition {
        faults.partition(a);
    }
    for a in deaf {
        faults.deafen(a);
    }
    let st = faults.stats();
    json!({"ok": true, "faults": {
        "sent": st.sent, "dropped": st.dropped, "duplicated": st.duplicated,
        "delayed": st.delayed, "reordered": st.reordered,
    }})
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use peerbus_transport::NodeId;

    use super::*;
    use crate::engine::wire::Kind;

    fn env(payload: Vec<u8>) -> Envelope {
        Envelope {
            origin: NodeId::from_bytes([1; 32]),
            log: "svc:orders".into(),
            seq: 7,
            kind: Kind::Send,
            destination: "orders".into(),
            key: Some("k".into()),
            headers: Default::default(),
            content_type: None,
            created_at_ms: 1_000,
            attempt: 1,
            payload: Bytes::from(payload),
        }
    }

    /// A listed entry shows a payload's first bytes and its whole length; an entry in flight
    /// names its node, and its times are Unix times.
    #[test]
    fn an_entry_shows_the_start_of_a_large_payload_and_where_it_stands() {
        let big = env(vec![b'a'; PAYLOAD_SHOWN * 3]);
        let stored = LogEntryView::of_envelope(&big);
        assert_eq!(stored.payload.len(), PAYLOAD_SHOWN);
        assert_eq!(stored.payload_bytes, PAYLOAD_SHOWN * 3);
        assert_eq!((stored.state, stored.attempts), ("stored", None));

        let peer = NodeId::from_bytes([2; 32]);
        let snapshot = EntrySnapshot {
            env: Arc::new(env(b"small".to_vec())),
            state: EntryState::InFlight(peer),
            attempts: 2,
            not_before: 0,
            expires_at: Some(50),
        };
        let live = LogEntryView::of_entry(&snapshot, |t| 1_000_000 + t);
        assert_eq!((live.payload.as_str(), live.payload_bytes), ("small", 5));
        assert_eq!((live.state, live.attempts), ("in_flight", Some(2)));
        assert_eq!(live.to, Some(peer.to_string()));
        assert_eq!(
            (live.expires_at_ms, live.not_before_ms),
            (Some(1_000_050), None)
        );
        assert_eq!((live.log.as_str(), live.seq), ("svc:orders", 7));
    }
}
