//! An in-process "LAN" for tests: discovery without sockets.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::{Notify, mpsc};
use tokio::task::JoinHandle;
use tracing::Instrument;

use crate::pending::Pending;
use crate::txt::check_local;
use crate::{Discovery, DiscoveryError, DiscoveryEvent, NodeId, PeerRecord, runtime};

/// The most members a [`MemoryNetwork`] holds at once; [`Discovery::start`]
/// beyond it fails with [`DiscoveryError::MemberLimit`].
pub const MEMORY_MEMBER_LIMIT: usize = 4096;

/// A shared in-process registry standing in for a LAN. Clones share it; every
/// [`MemoryDiscovery`] made from it sees the others of the same mesh.
#[derive(Clone, Debug, Default)]
pub struct MemoryNetwork {
    registry: Arc<Mutex<Registry>>,
}

#[derive(Debug, Default)]
struct Registry {
    next_token: u64,
    members: HashMap<u64, Member>,
}

#[derive(Debug)]
struct Member {
    record: PeerRecord,
    mailbox: Arc<Mailbox>,
}

/// Events for one member, waiting for its forwarding task. Holds at most one
/// event per peer, so at most [`MEMORY_MEMBER_LIMIT`] events.
#[derive(Debug, Default)]
struct Mailbox {
    state: Mutex<MailboxState>,
    notify: Notify,
}

#[derive(Debug, Default)]
struct MailboxState {
    pending: Pending,
    closed: bool,
}

/// Locks `mutex`. A poisoned lock is used as is: every critical section here
/// leaves the data consistent.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Mailbox {
    fn push(&self, peer: NodeId, event: DiscoveryEvent) {
        {
            let mut state = lock(&self.state);
            if state.closed {
                return;
            }
            state.pending.push(peer, event);
        }
        self.notify.notify_one();
    }

    fn close(&self) {
        lock(&self.state).closed = true;
        self.notify.notify_one();
    }

    /// Delivers queued events to `events` until the mailbox is closed or the
    /// receiver is gone. The lock is never held across an await.
    async fn forward(self: Arc<Self>, events: mpsc::Sender<DiscoveryEvent>) {
        loop {
            let next = {
                let mut state = lock(&self.state);
                if state.closed {
                    return;
                }
                state.pending.pop()
            };
            match next {
                Some(event) => {
                    tracing::debug!(?event, "memory discovery event");
                    if events.send(event).await.is_err() {
                        return;
                    }
                }
                // A notify_one() between pop() and here stores a permit, so no
                // wake-up is lost.
                None => self.notify.notified().await,
            }
        }
    }
}

impl MemoryNetwork {
    /// An empty network.
    pub fn new() -> Self {
        Self::default()
    }

    /// A discovery attached to this network; it joins on [`Discovery::start`].
    pub fn discovery(&self) -> MemoryDiscovery {
        MemoryDiscovery {
            network: self.clone(),
            running: None,
        }
    }
}

/// One member of a [`MemoryNetwork`]. On start it is reported `Up` to every
/// running member of the same mesh and learns them all; on stop (or drop) they
/// get `Down`. Members of other meshes are ignored, as are members with the same
/// node id as the local one.
#[derive(Debug)]
pub struct MemoryDiscovery {
    network: MemoryNetwork,
    running: Option<Running>,
}

#[derive(Debug)]
struct Running {
    token: u64,
    local: PeerRecord,
    mailbox: Arc<Mailbox>,
    task: JoinHandle<()>,
}

impl Discovery for MemoryDiscovery {
    fn start(
        &mut self,
        local: PeerRecord,
        events: mpsc::Sender<DiscoveryEvent>,
    ) -> Result<(), DiscoveryError> {
        if self.running.is_some() {
            return Err(DiscoveryError::AlreadyStarted(self.name()));
        }
        check_local(&local)?;
        let handle = runtime()?;
        let mailbox = Arc::new(Mailbox::default());
        let token = {
            let mut registry = lock(&self.network.registry);
            if registry.members.len() >= MEMORY_MEMBER_LIMIT {
                return Err(DiscoveryError::MemberLimit {
                    limit: MEMORY_MEMBER_LIMIT,
                });
            }
            for member in registry.members.values() {
                let peer = &member.record;
                if peer.mesh != local.mesh {
                    tracing::debug!(peer = %peer.node_id, mesh = %peer.mesh, "ignoring a member of another mesh");
                    continue;
                }
                if peer.node_id == local.node_id {
                    continue;
                }
                mailbox.push(peer.node_id, DiscoveryEvent::Up(peer.clone()));
                member
                    .mailbox
                    .push(local.node_id, DiscoveryEvent::Up(local.clone()));
            }
            let token = registry.next_token;
            registry.next_token += 1;
            registry.members.insert(
                token,
                Member {
                    record: local.clone(),
                    mailbox: mailbox.clone(),
                },
            );
            token
        };
        let span =
            tracing::debug_span!("discovery", kind = "memory", node = %local.node_id.short());
        let task = handle.spawn(mailbox.clone().forward(events).instrument(span));
        self.running = Some(Running {
            token,
            local,
            mailbox,
            task,
        });
        Ok(())
    }

    fn stop(&mut self) {
        let Some(running) = self.running.take() else {
            return;
        };
        {
            let mut registry = lock(&self.network.registry);
            registry.members.remove(&running.token);
            for member in registry.members.values() {
                if member.record.mesh == running.local.mesh
                    && member.record.node_id != running.local.node_id
                {
                    member.mailbox.push(
                        running.local.node_id,
                        DiscoveryEvent::Down(running.local.node_id),
                    );
                }
            }
        }
        running.mailbox.close();
        running.task.abort();
    }

    fn name(&self) -> &'static str {
        "memory"
    }
}

impl Drop for MemoryDiscovery {
    fn drop(&mut self) {
        self.stop();
    }
}
