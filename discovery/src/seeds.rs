//! Static seed addresses.

use std::net::SocketAddr;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::Instrument;

use crate::{Discovery, DiscoveryError, DiscoveryEvent, PeerRecord, runtime};

/// Reports a fixed list of addresses as [`DiscoveryEvent::Seed`], once each, on
/// start. Dialing them, learning their ids and re-dialing with backoff is the
/// node's job. Announces nothing.
#[derive(Debug)]
pub struct StaticDiscovery {
    seeds: Vec<SocketAddr>,
    task: Option<JoinHandle<()>>,
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
            task: None,
        }
    }
}

impl Discovery for StaticDiscovery {
    fn start(
        &mut self,
        _local: PeerRecord,
        events: mpsc::Sender<DiscoveryEvent>,
    ) -> Result<(), DiscoveryError> {
        if self.task.is_some() {
            return Err(DiscoveryError::AlreadyStarted(self.name()));
        }
        let handle = runtime()?;
        let seeds = self.seeds.clone();
        let span = tracing::debug_span!("discovery", kind = "static", seeds = seeds.len());
        self.task = Some(
            handle.spawn(
                async move {
                    for seed in seeds {
                        if events.send(DiscoveryEvent::Seed(seed)).await.is_err() {
                            return;
                        }
                        tracing::debug!(%seed, "seed reported");
                    }
                }
                .instrument(span),
            ),
        );
        Ok(())
    }

    fn stop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }

    fn name(&self) -> &'static str {
        "static"
    }
}

impl Drop for StaticDiscovery {
    fn drop(&mut self) {
        self.stop();
    }
}
