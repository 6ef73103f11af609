//! What a demo service tells the orchestrator: one JSON object per line on a child's stdout,
//! or the same value over a bounded channel with `--in-process`.

use std::net::SocketAddr;

use anyhow::Result;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::output::print_line;

/// Reports buffered between the services and the orchestrator (in-process mode, and the
/// hand-off from the pipe readers). A full channel makes reporters wait: handlers slow down,
/// nothing is dropped.
pub(crate) const REPORT_QUEUE: usize = 8_192;

/// One thing a service did.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "ev", rename_all = "snake_case")]
pub(crate) enum Event {
    /// The node is up and listens on `addr`.
    Ready {
        /// QUIC listen address.
        addr: SocketAddr,
        /// Short node id.
        node: String,
        /// Where its admin endpoint and live mesh page are served, if anywhere.
        #[serde(default)]
        admin: Option<SocketAddr>,
    },
    /// `payments` connected to or lost a peer.
    Peer {
        /// The peer's service.
        service: String,
        /// Short node id.
        node: String,
        /// Connected now.
        up: bool,
        /// Why it went down, when known.
        why: Option<String>,
    },
    /// `payments` found every service and starts paying.
    LoadStarted {
        /// Checkouts per second.
        rate: u32,
    },
    /// `payment.succeeded` for `order` is in payments' log (durable: fsync'd).
    Accepted {
        /// Order id.
        order: u64,
        /// Partition key (the customer).
        key: String,
        /// Sequence of this order among the key's orders.
        seq: u64,
    },
    /// A checkout did not go through (the balance request or the publish failed).
    Declined {
        /// Order id.
        order: u64,
        /// Why.
        reason: String,
    },
    /// A consumer handled an order for its group (reported before its handler returns, so
    /// before the acknowledgement).
    Handled {
        /// Durable group.
        group: String,
        /// Order id.
        order: u64,
        /// Partition key.
        key: String,
        /// Per-key sequence.
        seq: u64,
        /// Delivery attempt (1 = first).
        attempt: u32,
    },
    /// Payments' outgoing logs per subscriber group.
    Backlog {
        /// One entry per group log.
        logs: Vec<Backlog>,
    },
    /// `payments` stopped paying after `checkouts` checkouts.
    LoadDone {
        /// Checkouts attempted.
        checkouts: u64,
    },
    /// The service failed.
    Failed {
        /// The error.
        error: String,
    },
    /// The service's output ended (the process exited or was killed; never sent by a service).
    Closed,
}

/// One destination log in payments' store.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Backlog {
    /// The group.
    pub(crate) group: String,
    /// Entries not sent yet.
    pub(crate) waiting: usize,
    /// Entries sent, not acknowledged yet.
    pub(crate) in_flight: usize,
}

impl Backlog {
    /// Entries not acknowledged yet.
    pub(crate) fn total(&self) -> usize {
        self.waiting + self.in_flight
    }
}

/// An event and the instance it came from.
#[derive(Debug)]
pub(crate) struct Report {
    /// Instance name (`orders#2`).
    pub(crate) from: String,
    /// What happened.
    pub(crate) event: Event,
}

/// Where a service reports to.
#[derive(Clone, Debug)]
pub(crate) enum Reporter {
    /// JSON lines on stdout (a child process).
    Stdout,
    /// The orchestrator's channel (`--in-process`).
    Channel {
        /// Instance name.
        from: String,
        /// The orchestrator.
        tx: mpsc::Sender<Report>,
    },
}

impl Reporter {
    /// Reports `event`; waits while the orchestrator is behind.
    pub(crate) async fn report(&self, event: Event) -> Result<()> {
        match self {
            Reporter::Stdout => print_line(&serde_json::to_string(&event)?),
            Reporter::Channel { from, tx } => tx
                .send(Report {
                    from: from.clone(),
                    event,
                })
                .await
                .map_err(|_| anyhow::anyhow!("the demo orchestrator is gone")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_round_trip_as_json_lines() {
        let events = [
            Event::Handled {
                group: "orders".into(),
                order: 7,
                key: "customer-3".into(),
                seq: 2,
                attempt: 1,
            },
            Event::Backlog {
                logs: vec![Backlog {
                    group: "notifications".into(),
                    waiting: 4,
                    in_flight: 1,
                }],
            },
            Event::Closed,
        ];
        for e in events {
            let line = serde_json::to_string(&e).expect("encode");
            assert!(!line.contains('\n'));
            let back: Event = serde_json::from_str(&line).expect("decode");
            assert_eq!(back, e);
        }
    }
}
