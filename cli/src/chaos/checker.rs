//! The checker: reads every worker's journal and decides whether the mesh kept its promises.
//!
//! - **accepted**: `send`/`publish` returned Ok (journal `accepted`).
//! - **required consumers**: a send to `svc-j` must be handled by one instance of `svc-j`
//!   (consumer `svc:svc-j`); a publish by every service's group (`grp:svc-j` for each j).
//!   A publish whose receipt covered fewer groups than there are services is also counted
//!   as *short* (the publisher did not know every durable group yet); a group that never
//!   handled it makes it lost like any other.
//! - **delivered**: accepted messages handled by every required consumer. **undrained**: the
//!   rest whose every missing copy was still in its sender's log when the run ended (read
//!   from each node's store once it stopped): kept, not lost, but not delivered before the
//!   drain wait gave up (must be 0 too). **lost**: the others (must be 0).
//! - **duplicates**: handlings of a message by a consumer beyond its first. One is
//!   *explained* by the documented crash case when the node that handled the previous copy
//!   was SIGKILL'd between the two handlings (the handler ran, the dedup window was not yet
//!   persisted). Duplicates after a SIGKILL of the *sender* between the two handlings are
//!   counted apart (the restarted sender resent an unacknowledged entry to another instance).
//! - **order violations**: a consumer handles (origin, destination, key) sequence `n` for the
//!   first time after it already handled a higher sequence of the same stream. Handlings on
//!   different nodes are ordered by their journal clock (microseconds, one machine).
//! - **protocol faults**: connections a node closed because its peer broke the protocol
//!   (`protocol_violation`, `malformed_frame`, `frame_too_large`, `mesh_proof_failed`; the
//!   `closes` journal lines). Every node runs this build with one mesh key, so each one is a
//!   bug (an ack the sender refused, a frame that did not decode) and must be 0. Closes of an
//!   `unresponsive` peer (a frozen one stops reading) are expected and only counted.
//! - **requests**: an answered request must carry its own request's echo (else the reply
//!   reached the wrong caller), and every request must end by its deadline, give or take
//!   [`LATE_SLACK_MS`]: one that never ended is excused only by a SIGKILL of its node after
//!   it began, one that ended late only by a freeze of its node meanwhile. Failed requests
//!   are no loss (requests are not logged).
//! - **drain seconds** of a fault: from the fault's end until every message accepted before
//!   that end was handled by all its required consumers (none when one of them was lost).

use std::collections::{BTreeMap, HashMap, HashSet};

use peerbus::CloseCode;
use serde::Serialize;

use super::journal::Event;
use super::schedule::FaultKind;

/// A fault as it happened (absolute times, microseconds since the Unix epoch).
#[derive(Clone, Debug)]
pub(crate) struct FaultRecord {
    /// What.
    pub(crate) kind: FaultKind,
    /// Node indexes.
    pub(crate) targets: Vec<usize>,
    /// When it began (the signal was sent).
    pub(crate) start_us: u64,
    /// For a kill: when the process was seen dead (a SIGKILL'd process may still finish a
    /// journal line between `start_us` and this). Otherwise `start_us`.
    pub(crate) down_us: u64,
    /// When it was lifted (restart issued, SIGCONT sent, partition healed).
    pub(crate) end_us: u64,
}

/// Copies still in the nodes' logs when the run ended: the logs (consumers: `svc:…`,
/// `grp:…`) that held each (origin, per-origin sequence).
pub(crate) type Kept = HashMap<(usize, u64), Vec<String>>;

/// Which message a finding is about. Its fields are the finding's own in the report's JSON
/// (flattened).
#[derive(Clone, Debug, Serialize)]
pub(crate) struct MessageRef {
    /// Origin node.
    pub(crate) origin: usize,
    /// Per-origin sequence.
    pub(crate) seq: u64,
    /// Destination.
    pub(crate) destination: String,
    /// Key.
    pub(crate) key: String,
    /// Per-key sequence.
    pub(crate) key_seq: u64,
}

impl MessageRef {
    /// The message `seq` of node `origin`, as its sender's journal gave it.
    fn of((origin, seq): (usize, u64), s: &Sent) -> Self {
        MessageRef {
            origin,
            seq,
            destination: s.destination.clone(),
            key: s.key.clone(),
            key_seq: s.key_seq,
        }
    }
}

impl std::fmt::Display for MessageRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "node-{}'s seq {} to {} key {}#{}",
            self.origin, self.seq, self.destination, self.key, self.key_seq
        )
    }
}

/// One message the checker found lost (or, in [`Findings::undrained_messages`], undrained).
#[derive(Clone, Debug, Serialize)]
pub(crate) struct LostMessage {
    /// The message.
    #[serde(flatten)]
    pub(crate) message: MessageRef,
    /// When it was accepted: on the journals' monotonic clock in the checker's findings, in
    /// µs since the Unix epoch in the report (the run's start on the wall clock plus the
    /// monotonic time since).
    pub(crate) accepted_us: u64,
    /// Consumers that never handled it (for an undrained message, all of them had it in
    /// their log at the sender).
    pub(crate) missing: Vec<String>,
    /// Copies its receipt reported (one per group known to the publisher; 1 for a send).
    pub(crate) copies: usize,
}

/// One handling of a message by a consumer beyond its first: who handled it before and who
/// again, when, and the fault its cause names.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct DuplicateExample {
    /// The consumer (`svc:…` / `grp:…`).
    pub(crate) consumer: String,
    /// The message.
    #[serde(flatten)]
    pub(crate) message: MessageRef,
    /// The node that handled the previous copy, and when (on the same clocks as
    /// [`LostMessage::accepted_us`]).
    pub(crate) previous_by: usize,
    /// See [`DuplicateExample::previous_by`].
    pub(crate) previous_at_us: u64,
    /// The node that handled it again, and when.
    pub(crate) by: usize,
    /// See [`DuplicateExample::by`].
    pub(crate) at_us: u64,
    /// The two handlings in seconds since the run's start, as the fault table gives its
    /// faults' times (0 in the checker's findings; the report sets them).
    pub(crate) previous_at_s: f64,
    /// See [`DuplicateExample::previous_at_s`].
    pub(crate) at_s: f64,
    /// Its likeliest cause (a key of [`Findings::duplicate_causes`]).
    pub(crate) cause: &'static str,
    /// The fault the cause names: its number in the report's fault table (from 1), `None`
    /// for `no fault of the handler or sender`.
    pub(crate) fault: Option<usize>,
}

/// The message that a fault's drain waited for last: accepted before the fault ended, and
/// the last of those whose required consumers had all handled it.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct SlowestDelivery {
    /// The message.
    #[serde(flatten)]
    pub(crate) message: MessageRef,
    /// The consumer whose first handling came last (`svc:…` / `grp:…`).
    pub(crate) consumer: String,
    /// The node that handled it then.
    pub(crate) by: usize,
    /// When it was accepted and when that handling was, on the same clocks as
    /// [`LostMessage::accepted_us`].
    pub(crate) accepted_us: u64,
    /// See [`SlowestDelivery::accepted_us`].
    pub(crate) handled_us: u64,
}

/// One order violation.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct OrderViolation {
    /// The consumer (`svc:…` / `grp:…`).
    pub(crate) consumer: String,
    /// Origin node.
    pub(crate) origin: usize,
    /// Destination.
    pub(crate) destination: String,
    /// Key.
    pub(crate) key: String,
    /// The sequence handled late.
    pub(crate) key_seq: u64,
    /// The higher sequence handled before it.
    pub(crate) after: u64,
    /// The node that handled it late.
    pub(crate) by: usize,
    /// When, on the same clocks as [`LostMessage::accepted_us`].
    pub(crate) at_us: u64,
}

/// How long past its timeout a request may end before it counts as late: the node's timer
/// sweeps every 50 ms, and a loaded machine (every node of a run shares its cores) may not
/// run the caller at once. A request that ignored its deadline ends much later, or never.
pub(crate) const LATE_SLACK_MS: u64 = 1_000;

/// A request that never ended, or ended late.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct RequestProblem {
    /// The requesting node.
    pub(crate) origin: usize,
    /// The request's number in its worker process.
    pub(crate) request: u64,
    /// The service asked.
    pub(crate) service: String,
    /// Its timeout.
    pub(crate) timeout_ms: u64,
    /// How long it took; `None` when it never ended.
    pub(crate) ms: Option<u64>,
}

/// What the checker found.
#[derive(Clone, Debug, Default, Serialize)]
pub(crate) struct Findings {
    /// Send/publish calls started (journal `intent`).
    pub(crate) intents: u64,
    /// Messages acknowledged by `send`/`publish`.
    pub(crate) accepted: u64,
    /// Of those, sends.
    pub(crate) accepted_sends: u64,
    /// Of those, publishes.
    pub(crate) accepted_publishes: u64,
    /// `send`/`publish` calls that returned an error (not acknowledged, not required).
    pub(crate) failed: u64,
    /// Accepted messages handled by every required consumer.
    pub(crate) delivered: u64,
    /// Accepted messages some required consumer never handled (must be 0).
    pub(crate) lost: u64,
    /// The first lost messages (at most 50).
    pub(crate) lost_messages: Vec<LostMessage>,
    /// Accepted messages not handled by every required consumer, whose every missing copy
    /// was still in its sender's log when the run ended: not lost, but not delivered before
    /// the drain wait gave up (must be 0: a consumer that cannot keep up, or a message
    /// stuck in its log).
    pub(crate) undrained: u64,
    /// The first undrained messages (at most 50).
    pub(crate) undrained_messages: Vec<LostMessage>,
    /// Publishes whose receipt covered fewer groups than there are services.
    pub(crate) short_publishes: u64,
    /// Handler runs in all.
    pub(crate) handled_events: u64,
    /// Handlings beyond the first of a message by a consumer.
    pub(crate) duplicates: u64,
    /// Of those, explained by a SIGKILL of the node that handled the previous copy.
    pub(crate) duplicates_explained: u64,
    /// Of the rest, handled again after a SIGKILL of the message's *sender* between the two
    /// handlings: the restarted sender resent an entry whose ack it had not received, to
    /// another instance (whose dedup window had not seen it).
    pub(crate) duplicates_after_sender_kill: u64,
    /// Duplicates handled after a later message of their key (same consumer, sender and
    /// destination) had been handled: a repeat that a handler keeping per-key state sees out
    /// of order. Not an order violation (each message's first handling is in order), and not
    /// a failure: a sender that restarts resends what it has no ack for, to whichever instance
    /// now has the key. Receivers drop a first attempt that waited past the ack timeout to
    /// keep these rare (docs/CHAOS.md has runs with that drop disabled).
    pub(crate) duplicates_behind_their_key: u64,
    /// Every duplicate by its likeliest cause: the first of kill, graceful restart, partition
    /// and freeze of the node that handled the previous copy or of the sender, then of the
    /// node that handled it again, overlapping the time between the two handlings; else
    /// `no fault of the handler or sender`.
    pub(crate) duplicate_causes: BTreeMap<String, u64>,
    /// The first duplicates (at most 50), each with its handlings and cause.
    pub(crate) duplicate_examples: Vec<DuplicateExample>,
    /// Connections closed for a broken protocol (must be 0; see
    /// [`CloseCode::is_protocol_fault`]).
    pub(crate) protocol_faults: u64,
    /// Every connection close the nodes journaled, by close code name.
    pub(crate) closes: BTreeMap<String, u64>,
    /// Entries the nodes sent again (after a nack, an ack timeout, a lost peer), as their
    /// `counts` lines say: at least this many (a kill loses its node's last sample).
    pub(crate) redelivered: u64,
    /// Copies the nodes' dedup windows dropped before a handler, counted the same way.
    pub(crate) duplicates_dropped: u64,
    /// Order violations (must be 0).
    pub(crate) order_violations: u64,
    /// The first violations (at most 50).
    pub(crate) order_examples: Vec<OrderViolation>,
    /// Handled messages whose send never returned (crash in between): fine, not required.
    pub(crate) handled_unacknowledged: u64,
    /// Handled messages no journal ever intended to send (must be 0).
    pub(crate) phantoms: u64,
    /// Journal lines that could not be read (torn by a SIGKILL).
    pub(crate) torn_lines: usize,
    /// Per fault, in order: seconds from its end until everything accepted before then was
    /// handled (`None` when a message accepted before then was lost or undrained).
    pub(crate) drain_seconds: Vec<Option<f64>>,
    /// Per fault, in order: the message its drain waited for last, when that was handled
    /// after the fault's end (`None` when a message was lost, or everything accepted before
    /// then was handled by then).
    pub(crate) drain_slowest: Vec<Option<SlowestDelivery>>,
    /// Requests made (journal `request`: each ended, with a reply or an error).
    pub(crate) requests: u64,
    /// Of those, answered by their service's handler.
    pub(crate) requests_answered: u64,
    /// Answered with a reply that was not their own request's echo: a reply delivered to the
    /// wrong caller (must be 0).
    pub(crate) requests_wrong: u64,
    /// The others, by how they failed (timeouts, lost instances, no instance, …: requests
    /// are not logged, so faults may fail them).
    pub(crate) request_errors: BTreeMap<String, u64>,
    /// Slowest request, in milliseconds (a frozen requester's clock runs on).
    pub(crate) request_max_ms: u64,
    /// Requests begun (journal `request_begun`).
    pub(crate) requests_begun: u64,
    /// Begun requests that never ended because a SIGKILL of their node came first.
    pub(crate) requests_cut_by_kill: u64,
    /// Begun requests that never ended although their node was not killed since: a caller
    /// left waiting past its deadline (must be 0).
    pub(crate) requests_unended: u64,
    /// Requests that ended more than [`LATE_SLACK_MS`] after their timeout, their node not
    /// frozen meanwhile (must be 0).
    pub(crate) requests_late: u64,
    /// Requests that ended that late while their node was frozen for part of the time (its
    /// clock runs on while it is stopped): expected.
    pub(crate) requests_late_frozen: u64,
    /// The first unended and late requests (at most 50).
    pub(crate) request_problems: Vec<RequestProblem>,
    /// Median and worst seconds from acceptance to the last required handling.
    pub(crate) latency_p50_s: f64,
    /// Worst seconds from acceptance to the last required handling.
    pub(crate) latency_max_s: f64,
    /// How a `--mesh-ca` run's revocation list spread and its renewed certificates were
    /// taken (`None` in a run of a mesh key).
    pub(crate) mesh_ca: Option<MeshCaRun>,
    /// How a `--rotate-key` run's rotation of the mesh key went (`None` without one).
    pub(crate) key_rotation: Option<super::rotation::KeyRotationRun>,
}

/// How the revocation list of a `--mesh-ca` run spread from node-0, the one node that reads
/// its file, to the others, whether it cut off the running node whose certificate it
/// revoked, and whether every node took its renewed certificate (the revoked node a member
/// again with it).
#[derive(Clone, Debug, Serialize)]
pub(crate) struct MeshCaRun {
    /// The node whose certificate the list revoked, while it ran.
    pub(crate) revoked_node: usize,
    /// Seconds into the run when the list file changed.
    pub(crate) revoked_at_s: f64,
    /// Seconds after that until every node expected to hold the list, the revoked node
    /// aside (it refuses a list that revokes it), answered that it did, while the faults
    /// ran; `None` when that was not before the workload ended. From then until the renewal
    /// the revoked node is cut off.
    pub(crate) reached_all_after_s: Option<f64>,
    /// Messages the revoked node accepted while it was cut off (kept in its log for later).
    pub(crate) sent_while_cut_off: u64,
    /// How many of those another node that holds lists handled before the renewal: a
    /// connection the list should have refused or closed carried them. Must be 0.
    pub(crate) handled_while_cut_off: u64,
    /// Seconds after the revocation until the revoked node's status said its certificate
    /// is revoked (`mesh_certificate_revoked`), polled until the renewal; `None` when it did
    /// not before then.
    pub(crate) knew_after_s: Option<f64>,
    /// Nodes whose status still said their certificate is revoked at the end of the run,
    /// their renewed certificates presented. Must be 0.
    pub(crate) nodes_still_revoked: usize,
    /// Nodes that held it at the end of the run, every fault healed.
    pub(crate) nodes_holding: usize,
    /// Nodes expected to hold it: those of protocol 8 or later.
    pub(crate) nodes_expected: usize,
    /// Seconds into the run when every node's certificate file was renewed.
    pub(crate) renewed_at_s: f64,
    /// Seconds after that until the revoked node had a connection again, while the faults
    /// ran; `None` when that was not before the workload ended.
    pub(crate) readmitted_after_s: Option<f64>,
    /// Nodes that presented their renewed certificate at the end of the run.
    pub(crate) nodes_renewed: usize,
    /// Nodes in the run.
    pub(crate) nodes: usize,
}

impl MeshCaRun {
    /// Whether every node took what it had to (the list, and its renewed certificate) and
    /// nothing the revoked node sent while cut off got through.
    pub(crate) fn ok(&self) -> bool {
        self.list_ok() && self.cut_off_ok() && self.renewal_ok()
    }

    /// Every node expected to hold the list holds it.
    pub(crate) fn list_ok(&self) -> bool {
        self.nodes_holding == self.nodes_expected
    }

    /// Nothing the revoked node sent while cut off got through.
    pub(crate) fn cut_off_ok(&self) -> bool {
        self.handled_while_cut_off == 0
    }

    /// Every node presents its renewed certificate, and none says it is revoked.
    pub(crate) fn renewal_ok(&self) -> bool {
        self.nodes_renewed == self.nodes && self.nodes_still_revoked == 0
    }
}

/// Of the messages node `node` accepted in `[from_us, until_us)` (the journals' clock), how
/// many there were, and how many of them a node of `others` handled before `until_us`.
pub(crate) fn cut_off(
    journals: &[(usize, Vec<Event>)],
    node: usize,
    others: &[usize],
    from_us: u64,
    until_us: u64,
) -> (u64, u64) {
    let sent: HashSet<u64> = journals
        .iter()
        .filter(|(i, _)| *i == node)
        .flat_map(|(_, events)| events)
        .filter_map(|e| match e {
            Event::Accepted { t, o, g, .. } if *o == node && (from_us..until_us).contains(t) => {
                Some(*g)
            }
            _ => None,
        })
        .collect();
    let handled: HashSet<u64> = journals
        .iter()
        .filter(|(i, _)| others.contains(i))
        .flat_map(|(_, events)| events)
        .filter_map(|e| match e {
            Event::Handled { t, p, .. } if p.o == node && *t < until_us && sent.contains(&p.g) => {
                Some(p.g)
            }
            _ => None,
        })
        .collect();
    (sent.len() as u64, handled.len() as u64)
}

impl Findings {
    /// Whether every invariant holds.
    pub(crate) fn ok(&self) -> bool {
        self.lost == 0
            && self.undrained == 0
            && self.order_violations == 0
            && self.phantoms == 0
            && self.protocol_faults == 0
            && self.requests_wrong == 0
            && self.requests_unended == 0
            && self.requests_late == 0
            && self.mesh_ca.as_ref().is_none_or(MeshCaRun::ok)
            && self
                .key_rotation
                .as_ref()
                .is_none_or(super::rotation::KeyRotationRun::ok)
    }
}

struct Sent {
    destination: String,
    key: String,
    key_seq: u64,
    publish: bool,
    accepted_us: Option<u64>,
    copies: usize,
}

/// Whether a recorded fault of kind `recorded` is one of `kind`'s family: a one-way partition
/// counts as a partition.
fn same_family(recorded: FaultKind, kind: FaultKind) -> bool {
    recorded == kind || (recorded.cuts_a_link() && kind.cuts_a_link())
}

/// Why a message handled at `prev_t` on `prev_by` was handled again at `t` (see
/// [`Findings::duplicate_causes`]), and the index in `faults` of the fault that names it.
fn duplicate_cause(
    faults: &[FaultRecord],
    prev_t: u64,
    prev_by: usize,
    t: u64,
    by: usize,
    origin: usize,
) -> (&'static str, Option<usize>) {
    let overlaps = |fr: &FaultRecord, node: usize| {
        let until = if fr.kind == FaultKind::Kill {
            fr.down_us
        } else {
            fr.end_us
        };
        fr.targets.contains(&node) && fr.start_us <= t && until >= prev_t
    };
    let causes: [(FaultKind, usize, &'static str); 12] = [
        (FaultKind::Kill, prev_by, "kill of the handler"),
        (FaultKind::Kill, origin, "kill of the sender"),
        (
            FaultKind::Restart,
            prev_by,
            "graceful restart of the handler",
        ),
        (FaultKind::Restart, origin, "graceful restart of the sender"),
        (FaultKind::Partition, prev_by, "partition of the handler"),
        (FaultKind::Partition, origin, "partition of the sender"),
        (FaultKind::Freeze, prev_by, "freeze of the handler"),
        (FaultKind::Freeze, origin, "freeze of the sender"),
        // The node that handled it again was the one in trouble: it ran a delivery it had
        // received before the fault, after the sender had given it to another instance.
        (FaultKind::Freeze, by, "freeze of the repeating handler"),
        (
            FaultKind::Partition,
            by,
            "partition of the repeating handler",
        ),
        (
            FaultKind::Restart,
            by,
            "graceful restart of the repeating handler",
        ),
        (FaultKind::Kill, by, "kill of the repeating handler"),
    ];
    causes
        .iter()
        .find_map(|(kind, node, cause)| {
            faults
                .iter()
                .position(|fr| same_family(fr.kind, *kind) && overlaps(fr, *node))
                .map(|i| (*cause, Some(i)))
        })
        .unwrap_or(("no fault of the handler or sender", None))
}

/// Whether every begun request ended by its deadline (give or take [`LATE_SLACK_MS`]),
/// from the requests' `begun` (time, service, timeout) and `ended` (time, milliseconds) by
/// (node, worker process, number). A request its node's SIGKILL cut short journals no end;
/// one whose node was frozen meanwhile ends late, its timer stopped with it.
fn check_deadlines(
    f: &mut Findings,
    begun: &HashMap<(usize, u64, u64), (u64, &str, u64)>,
    ended: &HashMap<(usize, u64, u64), (u64, u64)>,
    faults: &[FaultRecord],
) {
    let hit = |kind: FaultKind, node: usize, from: u64, to: u64| {
        faults.iter().any(|fr| {
            fr.kind == kind && fr.targets.contains(&node) && fr.start_us <= to && fr.end_us >= from
        })
    };
    let mut ids: Vec<_> = begun.keys().collect();
    ids.sort();
    for id in ids {
        let (t, service, timeout_ms) = begun[id];
        let problem = match ended.get(id) {
            None if hit(FaultKind::Kill, id.0, t, u64::MAX) => {
                f.requests_cut_by_kill += 1;
                continue;
            }
            None => {
                f.requests_unended += 1;
                None
            }
            Some(&(_, ms)) if ms <= timeout_ms.saturating_add(LATE_SLACK_MS) => continue,
            Some(&(end, _)) if hit(FaultKind::Freeze, id.0, t, end) => {
                f.requests_late_frozen += 1;
                continue;
            }
            Some(&(_, ms)) => {
                f.requests_late += 1;
                Some(ms)
            }
        };
        if f.request_problems.len() < 50 {
            f.request_problems.push(RequestProblem {
                origin: id.0,
                request: id.2,
                service: service.to_string(),
                timeout_ms,
                ms: problem,
            });
        }
    }
}

/// Checks the journals (`(node index, events)`) of a run with `services` services, as
/// [`check_with_logs`] does with no log read.
pub(crate) fn check(
    journals: &[(usize, Vec<Event>)],
    torn_lines: usize,
    services: usize,
    faults: &[FaultRecord],
) -> Findings {
    check_with_logs(journals, torn_lines, services, faults, &Kept::new())
}

/// Checks the journals (`(node index, events)`) of a run with `services` services; `kept`
/// lists the copies still in the nodes' logs when the run ended (an unhandled copy there is
/// undrained, not lost).
pub(crate) fn check_with_logs(
    journals: &[(usize, Vec<Event>)],
    torn_lines: usize,
    services: usize,
    faults: &[FaultRecord],
    kept: &Kept,
) -> Findings {
    let mut f = Findings {
        torn_lines,
        ..Findings::default()
    };
    let mut sent: HashMap<(usize, u64), Sent> = HashMap::new();
    // (time, node, line) orders handlings; one node's lines are already in order.
    let mut handlings: Vec<(u64, usize, usize, &super::journal::Payload, &str)> = Vec::new();
    // Requests by (node, worker process, number): when each began, and how long it took.
    let mut begun: HashMap<(usize, u64, u64), (u64, &str, u64)> = HashMap::new();
    let mut ended: HashMap<(usize, u64, u64), (u64, u64)> = HashMap::new();
    for (_, events) in journals {
        for (line, e) in events.iter().enumerate() {
            match e {
                Event::Intent { p, publish, .. } => {
                    f.intents += 1;
                    sent.insert(
                        (p.o, p.g),
                        Sent {
                            destination: p.d.clone(),
                            key: p.k.clone(),
                            key_seq: p.n,
                            publish: *publish,
                            accepted_us: None,
                            copies: 0,
                        },
                    );
                }
                Event::Handled { t, p, by, c } => handlings.push((*t, *by, line, p, c)),
                Event::Closes { codes, .. } => {
                    for (code, n) in codes {
                        *f.closes.entry(code.clone()).or_default() += n;
                        if CloseCode::from_name(code).is_some_and(|c| c.is_protocol_fault()) {
                            f.protocol_faults += n;
                        }
                    }
                }
                Event::Counts {
                    redelivered,
                    duplicates_dropped,
                    ..
                } => {
                    f.redelivered += redelivered;
                    f.duplicates_dropped += duplicates_dropped;
                }
                Event::RequestBegun {
                    t,
                    o,
                    run,
                    r,
                    svc,
                    timeout_ms,
                } => {
                    f.requests_begun += 1;
                    begun.insert((*o, *run, *r), (*t, svc.as_str(), *timeout_ms));
                }
                Event::Request {
                    t,
                    o,
                    run,
                    r,
                    outcome,
                    ms,
                    wrong,
                    ..
                } => {
                    ended.insert((*o, *run, *r), (*t, *ms));
                    f.requests += 1;
                    f.request_max_ms = f.request_max_ms.max(*ms);
                    if outcome == "ok" {
                        f.requests_answered += 1;
                        f.requests_wrong += u64::from(*wrong);
                    } else {
                        *f.request_errors.entry(outcome.clone()).or_default() += 1;
                    }
                }
                Event::Start { .. } | Event::Accepted { .. } | Event::Failed { .. } => {}
            }
        }
    }
    for (_, events) in journals {
        for e in events {
            match e {
                Event::Accepted { t, o, g, copies } => {
                    if let Some(s) = sent.get_mut(&(*o, *g)) {
                        s.accepted_us = Some(*t);
                        s.copies = *copies;
                    }
                }
                Event::Failed { .. } => f.failed += 1,
                _ => {}
            }
        }
    }
    check_deadlines(&mut f, &begun, &ended, faults);
    handlings.sort_by_key(|h| (h.0, h.1, h.2));
    f.handled_events = handlings.len() as u64;

    // First handling per (message, consumer), duplicates, order.
    let mut first: HashMap<(usize, u64, &str), (u64, usize)> = HashMap::new();
    let mut last: HashMap<(usize, u64, &str), (u64, usize)> = HashMap::new();
    let mut highest: HashMap<(&str, usize, &str, &str), u64> = HashMap::new();
    let mut unacked_seen: HashSet<(usize, u64)> = HashSet::new();
    for &(t, by, _, p, c) in &handlings {
        let id = (p.o, p.g, c);
        match sent.get(&(p.o, p.g)) {
            None => f.phantoms += 1,
            Some(s) if s.accepted_us.is_none() => {
                if unacked_seen.insert((p.o, p.g)) {
                    f.handled_unacknowledged += 1;
                }
            }
            Some(_) => {}
        }
        if let Some(&(prev_t, prev_by)) = last.get(&id) {
            f.duplicates += 1;
            let (cause, fault) = duplicate_cause(faults, prev_t, prev_by, t, by, p.o);
            if f.duplicate_examples.len() < 50 {
                f.duplicate_examples.push(DuplicateExample {
                    consumer: c.to_string(),
                    message: MessageRef {
                        origin: p.o,
                        seq: p.g,
                        destination: p.d.clone(),
                        key: p.k.clone(),
                        key_seq: p.n,
                    },
                    previous_by: prev_by,
                    previous_at_us: prev_t,
                    by,
                    at_us: t,
                    previous_at_s: 0.0,
                    at_s: 0.0,
                    cause,
                    fault: fault.map(|i| i + 1),
                });
            }
            match cause {
                "kill of the handler" => f.duplicates_explained += 1,
                "kill of the sender" => f.duplicates_after_sender_kill += 1,
                _ => {}
            }
            *f.duplicate_causes.entry(cause.to_string()).or_default() += 1;
            if highest
                .get(&(c, p.o, p.d.as_str(), p.k.as_str()))
                .is_some_and(|&hi| p.n < hi)
            {
                f.duplicates_behind_their_key += 1;
            }
            last.insert(id, (t, by));
            continue;
        }
        first.insert(id, (t, by));
        last.insert(id, (t, by));
        let stream = (c, p.o, p.d.as_str(), p.k.as_str());
        let hi = highest.entry(stream).or_insert(p.n);
        if p.n < *hi {
            f.order_violations += 1;
            if f.order_examples.len() < 50 {
                f.order_examples.push(OrderViolation {
                    consumer: c.to_string(),
                    origin: p.o,
                    destination: p.d.clone(),
                    key: p.k.clone(),
                    key_seq: p.n,
                    after: *hi,
                    by,
                    at_us: t,
                });
            }
        } else {
            *hi = p.n;
        }
    }

    // Delivery per accepted message.
    let groups: Vec<String> = (0..services).map(|j| format!("grp:svc-{j}")).collect();
    // (accepted time, the last of its required first handlings or None when lost: (time,
    // id, consumer, node))
    type Handled = (u64, (usize, u64), String, usize);
    let mut done: Vec<(u64, Option<Handled>)> = Vec::new();
    let mut latencies: Vec<f64> = Vec::new();
    let mut ids: Vec<&(usize, u64)> = sent.keys().collect();
    ids.sort();
    for id in ids {
        let s = &sent[id];
        let Some(acc) = s.accepted_us else { continue };
        f.accepted += 1;
        let required: Vec<String> = if s.publish {
            f.accepted_publishes += 1;
            groups.clone()
        } else {
            f.accepted_sends += 1;
            vec![format!("svc:{}", s.destination)]
        };
        let short = s.publish && s.copies < services;
        if short {
            f.short_publishes += 1;
        }
        let mut missing = Vec::new();
        let mut slowest: Option<Handled> = None;
        for c in required {
            match first.get(&(id.0, id.1, c.as_str())) {
                Some(&(t, by)) => {
                    if slowest.as_ref().is_none_or(|h| t > h.0) {
                        slowest = Some((t, *id, c.clone(), by));
                    }
                }
                None => missing.push(c.clone()),
            }
        }
        let complete = slowest.as_ref().map_or(acc, |h| h.0.max(acc));
        if missing.is_empty() {
            f.delivered += 1;
            latencies.push(complete.saturating_sub(acc) as f64 / 1e6);
            done.push((acc, slowest));
        } else {
            // Every missing copy still in the sender's log: kept, only not delivered yet.
            let in_log = |c: &String| kept.get(id).is_some_and(|logs| logs.contains(c));
            let (count, examples) = if missing.iter().all(in_log) {
                (&mut f.undrained, &mut f.undrained_messages)
            } else {
                (&mut f.lost, &mut f.lost_messages)
            };
            *count += 1;
            if examples.len() < 50 {
                examples.push(LostMessage {
                    message: MessageRef::of(*id, s),
                    accepted_us: acc,
                    missing,
                    copies: s.copies,
                });
            }
            done.push((acc, None));
        }
    }
    latencies.sort_by(f64::total_cmp);
    f.latency_p50_s = latencies.get(latencies.len() / 2).copied().unwrap_or(0.0);
    f.latency_max_s = latencies.last().copied().unwrap_or(0.0);

    // Drain per fault.
    done.sort_by_key(|d| d.0);
    for fr in faults {
        // Of the messages accepted before the fault's end, the one handled last (with its
        // acceptance time), `None` when one of them was lost.
        let worst: Option<Option<(u64, &Handled)>> = done
            .iter()
            .take_while(|d| d.0 <= fr.end_us)
            .try_fold(None, |w: Option<(u64, &Handled)>, (acc, h)| {
                let h = h.as_ref()?;
                Some(match w {
                    Some(w) if w.1.0 >= h.0 => Some(w),
                    _ => Some((*acc, h)),
                })
            });
        f.drain_seconds.push(worst.map(|w| {
            let until = w.map_or(fr.end_us, |(_, h)| h.0.max(fr.end_us));
            until.saturating_sub(fr.end_us) as f64 / 1e6
        }));
        let slowest = worst.flatten().filter(|(_, h)| h.0 > fr.end_us);
        f.drain_slowest.push(
            slowest.map(|(acc, &(t, id, ref consumer, by))| SlowestDelivery {
                message: MessageRef::of(id, &sent[&id]),
                consumer: consumer.to_string(),
                by,
                accepted_us: acc,
                handled_us: t,
            }),
        );
    }
    f
}

#[cfg(test)]
mod tests {
    use super::super::journal::Payload;
    use super::*;

    fn p(o: usize, g: u64, d: &str, k: &str, n: u64) -> Payload {
        Payload {
            o,
            g,
            d: d.into(),
            k: k.into(),
            n,
        }
    }
    fn intent(t: u64, p: Payload, publish: bool) -> Event {
        Event::Intent { t, p, publish }
    }
    fn acc(t: u64, o: usize, g: u64, copies: usize) -> Event {
        Event::Accepted { t, o, g, copies }
    }
    /// A send of `p` (one copy) at `t`, accepted at `t + 1`.
    fn sent(t: u64, p: Payload) -> [Event; 2] {
        let (o, g) = (p.o, p.g);
        [intent(t, p, false), acc(t + 1, o, g, 1)]
    }
    fn h(t: u64, p: Payload, by: usize, c: &str) -> Event {
        Event::Handled {
            t,
            p,
            by,
            c: c.into(),
        }
    }

    #[test]
    fn a_clean_run_passes() {
        let j0 = vec![
            intent(1, p(0, 0, "svc-1", "a", 0), false),
            acc(2, 0, 0, 1),
            intent(3, p(0, 1, "chaos.events", "a", 0), true),
            acc(4, 0, 1, 2),
            h(5, p(0, 1, "chaos.events", "a", 0), 0, "grp:svc-0"),
        ];
        let j1 = vec![
            h(6, p(0, 0, "svc-1", "a", 0), 1, "svc:svc-1"),
            h(7, p(0, 1, "chaos.events", "a", 0), 1, "grp:svc-1"),
        ];
        let f = check(&[(0, j0), (1, j1)], 0, 2, &[]);
        assert!(f.ok(), "{f:?}");
        assert_eq!(
            (f.accepted, f.delivered, f.lost, f.duplicates),
            (2, 2, 0, 0)
        );
    }

    #[test]
    fn finds_loss_reordering_and_explains_crash_duplicates() {
        let kill = FaultRecord {
            kind: FaultKind::Kill,
            targets: vec![1],
            start_us: 25,
            down_us: 26,
            end_us: 30,
        };
        let j0 = [
            sent(1, p(0, 0, "svc-1", "a", 0)),
            sent(3, p(0, 1, "svc-1", "a", 1)),
            sent(5, p(0, 2, "svc-1", "a", 2)),
            // A publish to two groups that only one group handled: lost.
            [
                intent(7, p(0, 3, "chaos.events", "b", 0), true),
                acc(8, 0, 3, 2),
            ],
        ]
        .concat();
        let j1 = vec![
            h(20, p(0, 1, "svc-1", "a", 1), 1, "svc:svc-1"),
            h(21, p(0, 0, "svc-1", "a", 0), 1, "svc:svc-1"), // out of order
            h(22, p(0, 3, "chaos.events", "b", 0), 1, "grp:svc-1"),
            h(40, p(0, 1, "svc-1", "a", 1), 1, "svc:svc-1"), // after the kill: explained
            h(41, p(0, 1, "svc-1", "a", 1), 1, "svc:svc-1"), // not explained
        ];
        let f = check(&[(0, j0), (1, j1)], 0, 2, &[kill]);
        assert!(!f.ok());
        assert_eq!(f.accepted, 4);
        assert_eq!(f.lost, 2, "{:?}", f.lost_messages); // seq 2 never handled; publish short of a group
        assert_eq!(f.order_violations, 1);
        assert_eq!(f.order_examples[0].key_seq, 0);
        assert_eq!(f.order_examples[0].after, 1);
        assert_eq!((f.duplicates, f.duplicates_explained), (2, 1));
        assert_eq!(f.duplicates_after_sender_kill, 0);
        assert_eq!(f.duplicate_causes["kill of the handler"], 1);
        assert_eq!(f.duplicate_causes["no fault of the handler or sender"], 1);
        let d = &f.duplicate_examples;
        assert_eq!(d.len(), 2);
        assert_eq!(
            (d[0].message.seq, d[0].previous_at_us, d[0].at_us),
            (1, 20, 40)
        );
        assert_eq!((d[0].cause, d[0].fault), ("kill of the handler", Some(1)));
        assert_eq!(
            (d[1].previous_at_us, d[1].at_us, d[1].fault),
            (40, 41, None)
        );
        assert_eq!(f.drain_seconds, vec![None]);
    }

    /// An unhandled copy still in its sender's log is undrained, not lost, and fails the run
    /// all the same; a publish with one copy in the log and one nowhere is lost.
    #[test]
    fn an_unhandled_copy_still_in_its_senders_log_is_undrained_not_lost() {
        let j0 = [
            sent(1, p(0, 0, "svc-1", "a", 0)),
            sent(2, p(0, 1, "svc-1", "a", 1)),
            [
                intent(3, p(0, 2, "chaos.events", "b", 0), true),
                acc(4, 0, 2, 2),
            ],
        ]
        .concat();
        let j1 = vec![h(10, p(0, 0, "svc-1", "a", 0), 1, "svc:svc-1")];
        let kept = Kept::from([
            ((0, 1), vec!["svc:svc-1".to_string()]),
            ((0, 2), vec!["grp:svc-0".to_string()]),
        ]);
        let f = check_with_logs(&[(0, j0.clone()), (1, j1.clone())], 0, 2, &[], &kept);
        assert_eq!((f.delivered, f.undrained, f.lost), (1, 1, 1));
        assert_eq!(f.undrained_messages[0].message.seq, 1);
        assert_eq!(f.lost_messages[0].message.seq, 2);
        assert!(!f.ok());
        // Without the logs, both count as lost.
        let f = check(&[(0, j0), (1, j1)], 0, 2, &[]);
        assert_eq!((f.undrained, f.lost), (0, 2));
    }

    /// A duplicate names the fault of its cause by its number in the fault table, not the
    /// first fault of the run.
    #[test]
    fn a_duplicate_names_the_fault_that_caused_it() {
        let fault = |kind, target, start_us, end_us| FaultRecord {
            kind,
            targets: vec![target],
            start_us,
            down_us: start_us,
            end_us,
        };
        let faults = [
            fault(FaultKind::Partition, 3, 5, 8),
            fault(FaultKind::Freeze, 2, 12, 30),
        ];
        let j0 = sent(1, p(0, 0, "svc-1", "a", 0)).to_vec();
        let j1 = vec![h(10, p(0, 0, "svc-1", "a", 0), 1, "svc:svc-1")];
        let j2 = vec![h(31, p(0, 0, "svc-1", "a", 0), 2, "svc:svc-1")];
        let f = check(&[(0, j0), (1, j1), (2, j2)], 0, 2, &faults);
        assert_eq!(f.duplicates, 1);
        let d = &f.duplicate_examples[0];
        assert_eq!((d.previous_by, d.by), (1, 2));
        assert_eq!(
            (d.cause, d.fault),
            ("freeze of the repeating handler", Some(2))
        );
    }

    /// A duplicate of a message handled after a later message of its key (same consumer,
    /// sender and destination) counts as behind its key; a repeat of the latest does not, nor
    /// does a repeat on another key or at another consumer.
    #[test]
    fn counts_duplicates_behind_a_later_message_of_their_key() {
        let j0 = [
            sent(1, p(0, 0, "svc-1", "a", 0)),
            sent(3, p(0, 1, "svc-1", "a", 1)),
            sent(5, p(0, 2, "svc-1", "b", 0)),
        ]
        .concat();
        let j1 = vec![
            h(10, p(0, 0, "svc-1", "a", 0), 1, "svc:svc-1"),
            h(11, p(0, 2, "svc-1", "b", 0), 1, "svc:svc-1"),
            h(12, p(0, 1, "svc-1", "a", 1), 1, "svc:svc-1"),
            h(13, p(0, 1, "svc-1", "a", 1), 1, "svc:svc-1"), // the latest again
            h(14, p(0, 2, "svc-1", "b", 0), 1, "svc:svc-1"), // its key's latest
            h(15, p(0, 0, "svc-1", "a", 0), 1, "svc:svc-1"), // behind a@1
        ];
        let f = check(&[(0, j0), (1, j1)], 0, 2, &[]);
        assert!(f.ok(), "{f:?}");
        assert_eq!(f.order_violations, 0);
        assert_eq!(f.duplicates, 3);
        assert_eq!(f.duplicates_behind_their_key, 1);
    }

    fn closes(node: usize, codes: &[(&str, u64)]) -> Event {
        Event::Closes {
            t: 1,
            node,
            codes: codes.iter().map(|(c, n)| (c.to_string(), *n)).collect(),
        }
    }

    /// Checks a run of one delivered send whose sender's journal has `extra` lines too.
    fn delivered(extra: Vec<Event>) -> Findings {
        let mut j0 = sent(1, p(0, 0, "svc-1", "a", 0)).to_vec();
        j0.extend(extra);
        let j1 = vec![h(3, p(0, 0, "svc-1", "a", 0), 1, "svc:svc-1")];
        check(&[(0, j0), (1, j1)], 0, 2, &[])
    }

    #[test]
    fn a_close_for_a_protocol_fault_fails_the_run_and_an_unresponsive_peer_does_not() {
        // A frozen peer stopped reading twice; a node shut down: expected.
        let f = delivered(vec![
            closes(0, &[("unresponsive", 1)]),
            closes(0, &[("shutdown", 3), ("unresponsive", 1)]),
        ]);
        assert!(f.ok(), "{f:?}");
        assert_eq!(f.protocol_faults, 0);
        assert_eq!(f.closes["unresponsive"], 2);
        assert_eq!(f.closes["shutdown"], 3);
        // An ack the sender refused (or a frame that did not decode) is a bug.
        let f = delivered(vec![
            closes(0, &[("unresponsive", 1)]),
            closes(0, &[("protocol_violation", 1), ("malformed_frame", 2)]),
        ]);
        assert!(!f.ok());
        assert_eq!((f.lost, f.protocol_faults), (0, 3));
    }

    #[test]
    fn refusals_of_a_revoked_certificate_are_not_protocol_faults() {
        let f = delivered(vec![closes(0, &[("revoked_certificate", 7)])]);
        assert!(f.ok(), "{f:?}");
        assert_eq!((f.protocol_faults, f.closes["revoked_certificate"]), (0, 7));
    }

    #[test]
    fn a_message_of_a_cut_off_node_counts_when_another_list_holder_handled_it_before_the_renewal() {
        // Node 2 is cut off from 100 to 200 µs. Messages 1 and 2 were accepted meanwhile;
        // message 0 before (handled anywhere, any time: not counted) and message 3 after.
        let j2 = vec![
            acc(50, 2, 0, 1),
            acc(120, 2, 1, 1),
            acc(150, 2, 2, 2),
            acc(210, 2, 3, 1),
            // Its own handler's copy does not count.
            h(160, p(2, 2, "t", "a", 0), 2, "grp:svc-2"),
        ];
        let j0 = vec![
            h(130, p(2, 0, "svc-0", "a", 0), 0, "svc:svc-0"),
            // Handled after the renewal: kept in node 2's log, sent once readmitted.
            h(250, p(2, 1, "svc-0", "a", 1), 0, "svc:svc-0"),
        ];
        let j1 = vec![h(190, p(2, 2, "t", "a", 0), 1, "grp:svc-1")];
        let journals = [(0, j0), (1, j1), (2, j2)];
        assert_eq!(cut_off(&journals, 2, &[0, 1], 100, 200), (2, 1));
        // A node that does not hold lists (an older protocol) may still take them.
        assert_eq!(cut_off(&journals, 2, &[0], 100, 200), (2, 0));
        let run = |handled_while_cut_off| MeshCaRun {
            revoked_node: 2,
            revoked_at_s: 1.0,
            reached_all_after_s: Some(0.1),
            sent_while_cut_off: 2,
            handled_while_cut_off,
            knew_after_s: Some(0.3),
            nodes_still_revoked: 0,
            nodes_holding: 3,
            nodes_expected: 3,
            renewed_at_s: 2.0,
            readmitted_after_s: Some(0.2),
            nodes_renewed: 3,
            nodes: 3,
        };
        assert!(run(0).ok());
        assert!(!run(1).ok());
        assert!(
            !MeshCaRun {
                nodes_still_revoked: 1,
                ..run(0)
            }
            .ok()
        );
    }

    #[test]
    fn recovery_counts_add_up_over_lines_and_nodes_and_pass_the_run() {
        let counts = |node, redelivered, duplicates_dropped| Event::Counts {
            t: 1,
            node,
            redelivered,
            duplicates_dropped,
        };
        let f = delivered(vec![counts(0, 3, 0), counts(0, 4, 1), counts(1, 0, 2)]);
        assert!(f.ok(), "{f:?}");
        assert_eq!((f.redelivered, f.duplicates_dropped), (7, 3));
    }

    fn request(r: u64, outcome: &str, wrong: bool) -> Event {
        Event::Request {
            t: 1,
            o: 0,
            run: 0,
            r,
            svc: "svc-1".into(),
            outcome: outcome.into(),
            ms: 10 * r,
            wrong,
        }
    }

    #[test]
    fn a_reply_to_the_wrong_request_fails_the_run_and_failed_requests_do_not() {
        // Requests are not logged: a fault may fail them, and that is no loss.
        let f = delivered(vec![
            request(1, "ok", false),
            request(2, "timeout", false),
            request(3, "peer_lost", false),
            request(4, "timeout", false),
        ]);
        assert!(f.ok(), "{f:?}");
        assert_eq!(
            (f.requests, f.requests_answered, f.requests_wrong),
            (4, 1, 0)
        );
        assert_eq!(f.request_errors["timeout"], 2);
        assert_eq!(f.request_errors["peer_lost"], 1);
        assert_eq!(f.request_max_ms, 40);
        // A reply that is not the echo of its own request reached the wrong caller.
        let f = delivered(vec![request(1, "ok", false), request(2, "ok", true)]);
        assert!(!f.ok());
        assert_eq!((f.requests_answered, f.requests_wrong), (2, 1));
    }

    fn begun(t: u64, o: usize, r: u64) -> Event {
        Event::RequestBegun {
            t,
            o,
            run: 7,
            r,
            svc: "svc-1".into(),
            timeout_ms: 2_000,
        }
    }

    fn ended(t: u64, o: usize, r: u64, ms: u64) -> Event {
        Event::Request {
            t,
            o,
            run: 7,
            r,
            svc: "svc-1".into(),
            outcome: if ms >= 2_000 { "timeout" } else { "ok" }.into(),
            ms,
            wrong: false,
        }
    }

    fn fault(kind: FaultKind, node: usize, start_us: u64, end_us: u64) -> FaultRecord {
        FaultRecord {
            kind,
            targets: vec![node],
            start_us,
            down_us: start_us,
            end_us,
        }
    }

    #[test]
    fn a_request_that_never_ends_or_ends_late_fails_the_run_unless_its_node_was_killed_or_frozen() {
        // One answered at once, one timed out on time, one 900 ms past its timeout (within
        // the slack), one cut short by a kill of its node.
        let on_time = vec![
            begun(1_000, 0, 1),
            ended(2_000, 0, 1, 1),
            begun(3_000, 0, 2),
            ended(2_003_000, 0, 2, 2_000),
            begun(4_000, 0, 3),
            ended(2_904_000, 0, 3, 2_900),
            begun(5_000, 0, 4),
        ];
        let kill = fault(FaultKind::Kill, 0, 6_000, 9_000);
        let f = check(&[(0, on_time.clone())], 0, 2, std::slice::from_ref(&kill));
        assert!(f.ok(), "{f:?}");
        assert_eq!(f.requests_begun, 4);
        assert_eq!(
            (f.requests_cut_by_kill, f.requests_unended, f.requests_late),
            (1, 0, 0)
        );
        // Without the kill, the fourth caller was left waiting.
        let f = check(&[(0, on_time.clone())], 0, 2, &[]);
        assert!(!f.ok());
        assert_eq!(f.requests_unended, 1);
        assert_eq!(f.request_problems[0].request, 4);
        assert_eq!(f.request_problems[0].ms, None);
        // A kill of another node, or one before the request began, explains nothing.
        let other = fault(FaultKind::Kill, 1, 6_000, 9_000);
        let before = fault(FaultKind::Kill, 0, 100, 900);
        let f = check(&[(0, on_time)], 0, 2, &[other, before]);
        assert_eq!(f.requests_unended, 1);

        // Ended 1.1 s past its timeout: late, unless its node was frozen meanwhile.
        let late = vec![begun(1_000, 0, 1), ended(3_101_000, 0, 1, 3_100)];
        let f = check(&[(0, late.clone())], 0, 2, &[]);
        assert!(!f.ok());
        assert_eq!((f.requests_late, f.requests_late_frozen), (1, 0));
        assert_eq!(f.request_problems[0].ms, Some(3_100));
        let frozen = fault(FaultKind::Freeze, 0, 500_000, 2_500_000);
        let f = check(&[(0, late.clone())], 0, 2, &[frozen]);
        assert!(f.ok(), "{f:?}");
        assert_eq!((f.requests_late, f.requests_late_frozen), (0, 1));
        // A freeze of the server does not stop the caller's timer.
        let server = fault(FaultKind::Freeze, 1, 500_000, 2_500_000);
        let f = check(&[(0, late)], 0, 2, &[server]);
        assert_eq!(f.requests_late, 1);
    }

    #[test]
    fn drain_is_measured_from_the_fault_end() {
        let fr = FaultRecord {
            kind: FaultKind::Freeze,
            targets: vec![1],
            start_us: 0,
            down_us: 0,
            end_us: 1_000_000,
        };
        let j0 = vec![
            intent(1, p(0, 0, "svc-1", "a", 0), false),
            acc(500_000, 0, 0, 1),
            intent(550_000, p(0, 2, "svc-1", "b", 0), false),
            acc(600_000, 0, 2, 1),
            intent(2_000_000, p(0, 1, "svc-1", "a", 1), false),
            acc(2_000_001, 0, 1, 1),
        ];
        let j1 = vec![
            h(2_500_000, p(0, 2, "svc-1", "b", 0), 1, "svc:svc-1"),
            h(3_500_000, p(0, 0, "svc-1", "a", 0), 1, "svc:svc-1"),
            h(9_000_000, p(0, 1, "svc-1", "a", 1), 1, "svc:svc-1"),
        ];
        let f = check(&[(0, j0), (1, j1)], 0, 2, &[fr]);
        assert!(f.ok());
        assert_eq!(f.drain_seconds, vec![Some(2.5)]);
        let slowest = f.drain_slowest[0]
            .as_ref()
            .expect("the drain waited for seq 0");
        assert_eq!(
            (slowest.message.origin, slowest.message.seq, slowest.by),
            (0, 0, 1)
        );
        assert_eq!(
            (slowest.accepted_us, slowest.handled_us),
            (500_000, 3_500_000)
        );
    }
}
