//! Mesh events (peer up/down, refusals, dead letters, fault changes) for the
//! live page: a bounded broadcast for `/events` subscribers and a short
//! history for new viewers.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use peerbus_transport::NodeId;
use serde::Serialize;
use tokio::sync::broadcast;

/// Capacity of the broadcast buffer: a viewer that falls further behind
/// skips events (it is told so) and catches up from the next status snapshot.
pub const EVENT_BUFFER: usize = 256;
/// Events kept for viewers that connect later.
pub const EVENT_HISTORY: usize = 100;

/// What happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// A connection to a peer is up (hello exchanged).
    PeerUp,
    /// The connection to a peer closed.
    PeerDown,
    /// A peer refused us (for example a mesh key mismatch).
    Refused,
    /// An entry was moved to the dead-letter store.
    DeadLetter,
    /// The fault injector's settings changed (chaos runs).
    Fault,
}

/// One event as the page shows it.
#[derive(Clone, Debug, Serialize)]
pub struct MeshEvent {
    /// When it happened (Unix ms).
    pub at_ms: u64,
    /// What happened.
    pub kind: EventKind,
    /// The peer concerned, if any.
    pub peer: Option<String>,
    /// The peer's service, if known.
    pub service: Option<String>,
    /// Details (reason, log and sequence number …).
    pub detail: String,
}

/// The event hub of one node. Emitting never blocks and costs one short lock.
#[derive(Debug)]
pub(crate) struct Events {
    tx: broadcast::Sender<Arc<MeshEvent>>,
    history: Mutex<VecDeque<MeshEvent>>,
}

impl Events {
    pub(crate) fn new() -> Self {
        let (tx, _) = broadcast::channel(EVENT_BUFFER);
        Self {
            tx,
            history: Mutex::new(VecDeque::with_capacity(EVENT_HISTORY)),
        }
    }

    /// Records and broadcasts an event.
    pub(crate) fn emit(
        &self,
        kind: EventKind,
        peer: Option<NodeId>,
        service: Option<&str>,
        detail: impl Into<String>,
    ) {
        let ev = MeshEvent {
            at_ms: crate::message::now_unix_ms(),
            kind,
            peer: peer.map(|p| p.to_string()),
            service: service.map(str::to_string),
            detail: detail.into(),
        };
        {
            let mut h = crate::runtime::lock(&self.history);
            if h.len() >= EVENT_HISTORY {
                h.pop_front();
            }
            h.push_back(ev.clone());
        }
        // No receiver is fine: nobody watches the page.
        let _ = self.tx.send(Arc::new(ev));
    }

    /// The most recent events, oldest first.
    pub(crate) fn recent(&self) -> Vec<MeshEvent> {
        crate::runtime::lock(&self.history)
            .iter()
            .cloned()
            .collect()
    }

    /// A receiver of events from now on.
    pub(crate) fn subscribe(&self) -> broadcast::Receiver<Arc<MeshEvent>> {
        self.tx.subscribe()
    }
}
