//! Static seed addresses, and the task a seed discovery runs.

use std::future::Future;
use std::net::SocketAddr;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::Instrument;

use crate::{Discovery, DiscoveryError, DiscoveryEvent, PeerRecord, runtime};

/// The task a discovery that only reports seeds ([`StaticDiscovery`],
/// [`DnsDiscovery`](crate::DnsDiscovery)) runs while started; dropping it stops it.
#[derive(Debug, Default)]
pub(crate) struct SeedTask(Option<JoinHandle<()>>);

impl SeedTask {
    /// Spawns `work` on the current runtime in `span`, unless a task runs already (`name`
    /// is the discovery's, for the error).
    pub(crate) fn start(
        &mut self,
        name: &'static str,
        span: tracing::Span,
        work: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), DiscoveryError> {
        if self.0.is_some() {
            return Err(DiscoveryError::AlreadyStarted(name));
        }
        self.0 = Some(runtime()?.spawn(work.instrument(span)));
        Ok(())
    }

    /// Whether it was started and not stopped since (a task that did its work and ended
    /// counts).
    pub(crate) fn is_started(&self) -> bool {
        self.0.is_some()
    }

    /// Stops it (idempotent).
    pub(crate) fn stop(&mut self) {
        if let Some(task) = self.0.take() {
            task.abort();
        }
    }
}

impl Drop for SeedTask {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Reports a fixed list of addresses as [`DiscoveryEvent::Seed`], once each, on
/// start. Dialing them, learning their ids and re-dialing with backoff is the
/// node's job. Announces nothing.
#[derive(Debug)]
pub struct StaticDiscovery {
    seeds: Vec<SocketAddr>,
    task: SeedTask,
}

impl StaticDiscovery {
    /// A discovery reporting `seeds` (duplicates are reported once).
    pub fn new(seeds: Vec<SocketAddr>) -> Self {
        let mut unique = Vec::with_capacity(seeds.len());
        for seed in seeds {
            if !unique.contains(&seed) {
                unique.push(seed);
            }
        }
        Self {
            seeds: unique,
            task: SeedTask::default(),
        }
    }
}

impl Discovery for StaticDiscovery {
    fn start(
        &mut self,
        _local: PeerRecord,
        events: mpsc::Sender<DiscoveryEvent>,
    ) -> Result<(), DiscoveryError> {
        let seeds = self.seeds.clone();
        let span = tracing::debug_span!("discovery", kind = "static", seeds = seeds.len());
        self.task.start(self.name(), span, async move {
            for seed in seeds {
                if events.send(DiscoveryEvent::Seed(seed)).await.is_err() {
                    return;
                }
                tracing::debug!(%seed, "seed reported");
            }
        })
    }

    fn stop(&mut self) {
        self.task.stop();
    }

    fn name(&self) -> &'static str {
        "static"
    }
}
