//! Seeds from DNS names: each address a name resolves to is a seed, and the names are
//! resolved again now and then, so that a Kubernetes headless service (one `A`/`AAAA` record
//! per ready pod) or any DNS name with several records keeps the mesh's view of its members.

use std::collections::BTreeSet;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::seeds::SeedTask;
use crate::{Discovery, DiscoveryError, DiscoveryEvent, PeerRecord};

/// How often [`DnsDiscovery`] resolves its names again by default: a pod that becomes
/// ready is dialed within this (Kubernetes' own DNS caches records for up to 30 s).
pub const DNS_REFRESH: Duration = Duration::from_secs(10);

/// Most addresses one [`DnsDiscovery`] tracks over all its names: the records come from the
/// network, so their number is bounded. Addresses beyond it are left out (with a warning)
/// until others go.
pub const DNS_SEED_LIMIT: usize = 1024;

/// Longest one resolution of a name may take before it counts as failed.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);

/// The future a [`Resolver`] returns.
pub type ResolveFuture = Pin<Box<dyn Future<Output = io::Result<Vec<SocketAddr>>> + Send>>;

/// Turns a `host:port` name into the addresses it stands for. The default is the system's
/// resolver ([`tokio::net::lookup_host`]); [`DnsDiscovery::with_resolver`] takes another (a
/// service registry, or a fixed answer in tests).
pub type Resolver = Arc<dyn Fn(&str) -> ResolveFuture + Send + Sync>;

/// Reports the addresses of DNS names as seeds. Each name is `host:port` (the port is the
/// one peerbus nodes listen on there: give nodes a fixed `listen` port). At start and every
/// [`refresh`](Self::refresh) (default [`DNS_REFRESH`]) every name is resolved; an address
/// not reported before becomes a [`DiscoveryEvent::Seed`], and one that no name resolves to
/// any more a [`DiscoveryEvent::SeedGone`] (the node stops dialing it; a live connection to
/// it stays, as the connection is the truth about liveness). A name that fails to resolve
/// keeps the addresses it had: a DNS outage does not look like every peer leaving. Dialing
/// the seeds, learning their ids and redialing with backoff is the node's job, as for
/// [`StaticDiscovery`](crate::StaticDiscovery). Announces nothing: the records are the
/// deployment's (a headless service lists its ready pods).
pub struct DnsDiscovery {
    names: Vec<String>,
    refresh: Duration,
    resolver: Resolver,
    task: SeedTask,
}

impl std::fmt::Debug for DnsDiscovery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DnsDiscovery")
            .field("names", &self.names)
            .field("refresh", &self.refresh)
            .field("started", &self.task.is_started())
            .finish_non_exhaustive()
    }
}

impl DnsDiscovery {
    /// A discovery resolving `names` (`host:port` each; duplicates are resolved once) with
    /// the system's resolver.
    pub fn new(names: impl IntoIterator<Item = impl Into<String>>) -> Self {
        let mut unique: Vec<String> = Vec::new();
        for name in names {
            let name = name.into();
            if !unique.contains(&name) {
                unique.push(name);
            }
        }
        Self {
            names: unique,
            refresh: DNS_REFRESH,
            resolver: Arc::new(|name: &str| {
                let name = name.to_string();
                Box::pin(async move { Ok(tokio::net::lookup_host(name).await?.collect()) })
            }),
            task: SeedTask::default(),
        }
    }

    /// Resolves the names every `every` instead of every [`DNS_REFRESH`] (at least every
    /// 100 ms).
    #[must_use]
    pub fn refresh(mut self, every: Duration) -> Self {
        self.refresh = every.max(Duration::from_millis(100));
        self
    }

    /// Resolves names with `resolver` instead of the system's resolver.
    #[must_use]
    pub fn with_resolver<F, Fut>(mut self, resolver: F) -> Self
    where
        F: Fn(&str) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = io::Result<Vec<SocketAddr>>> + Send + 'static,
    {
        self.resolver = Arc::new(move |name: &str| Box::pin(resolver(name)));
        self
    }

    /// Checks that `name` reads as `host:port`, as [`DnsDiscovery::new`] expects.
    ///
    /// # Errors
    ///
    /// A message saying what is wrong with it.
    pub fn check_name(name: &str) -> Result<(), String> {
        let Some((host, port)) = name.rsplit_once(':') else {
            return Err(format!("`{name}` has no port: give it as host:port"));
        };
        if host.is_empty() {
            return Err(format!("`{name}` has no host: give it as host:port"));
        }
        match port.parse::<u16>() {
            Ok(0) | Err(_) => Err(format!(
                "`{name}` has no usable port (`{port}`): give the port the nodes listen on"
            )),
            Ok(_) => Ok(()),
        }
    }
}

/// What the resolution loop keeps between rounds.
struct Tracked {
    /// The addresses each name resolved to last (kept when a resolution fails).
    per_name: Vec<BTreeSet<SocketAddr>>,
    /// The addresses reported as seeds and not yet as gone.
    reported: BTreeSet<SocketAddr>,
    /// The last error of each name, so that a repeat is not logged as a warning again.
    last_error: Vec<Option<String>>,
}

impl Tracked {
    /// Takes in what name `i` resolved to: its addresses, or an error (logged as a warning
    /// unless it repeats the last one), which keeps the addresses it had.
    fn looked_up(&mut self, i: usize, name: &str, looked_up: io::Result<Vec<SocketAddr>>) {
        match looked_up {
            Ok(addrs) => {
                self.last_error[i] = None;
                // No more than can be reported: the answer comes from the network.
                self.per_name[i] = addrs.into_iter().take(DNS_SEED_LIMIT).collect();
            }
            Err(e) => {
                let e = e.to_string();
                if self.last_error[i].as_ref() != Some(&e) {
                    tracing::warn!(%name, error = %e, "could not resolve a DNS seed; keeping its last addresses");
                }
                self.last_error[i] = Some(e);
            }
        }
    }

    /// The events that bring `reported` to the union of `per_name` (within
    /// [`DNS_SEED_LIMIT`]): gone ones first, so that room is made before new ones come.
    fn changes(&mut self) -> Vec<DiscoveryEvent> {
        let wanted: BTreeSet<SocketAddr> = self.per_name.iter().flatten().copied().collect();
        let gone: Vec<SocketAddr> = self.reported.difference(&wanted).copied().collect();
        let mut events = Vec::new();
        for addr in gone {
            self.reported.remove(&addr);
            events.push(DiscoveryEvent::SeedGone(addr));
        }
        let mut left_out = 0usize;
        for addr in wanted {
            if self.reported.contains(&addr) {
                continue;
            }
            if self.reported.len() >= DNS_SEED_LIMIT {
                left_out += 1;
                continue;
            }
            self.reported.insert(addr);
            events.push(DiscoveryEvent::Seed(addr));
        }
        if left_out > 0 {
            tracing::warn!(
                left_out,
                limit = DNS_SEED_LIMIT,
                "DNS names resolve to more addresses than a node tracks; leaving some out"
            );
        }
        events
    }
}

impl Discovery for DnsDiscovery {
    fn start(
        &mut self,
        _local: PeerRecord,
        events: mpsc::Sender<DiscoveryEvent>,
    ) -> Result<(), DiscoveryError> {
        if let Some(e) = self.names.iter().find_map(|n| Self::check_name(n).err()) {
            return Err(DiscoveryError::InvalidName(e));
        }
        let (names, refresh, resolver) = (self.names.clone(), self.refresh, self.resolver.clone());
        let span = tracing::debug_span!("discovery", kind = "dns", names = ?names);
        let mut tracked = Tracked {
            per_name: vec![BTreeSet::new(); names.len()],
            reported: BTreeSet::new(),
            last_error: vec![None; names.len()],
        };
        self.task.start(self.name(), span, async move {
            let mut tick = tokio::time::interval(refresh);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                for (i, name) in names.iter().enumerate() {
                    let looked_up = tokio::time::timeout(LOOKUP_TIMEOUT, resolver(name))
                        .await
                        .unwrap_or_else(|_| {
                            Err(io::Error::new(io::ErrorKind::TimedOut, "timed out"))
                        });
                    tracked.looked_up(i, name, looked_up);
                }
                for event in tracked.changes() {
                    tracing::debug!(?event, "DNS seeds changed");
                    if events.send(event).await.is_err() {
                        return;
                    }
                }
            }
        })
    }

    fn stop(&mut self) {
        self.task.stop();
    }

    fn name(&self) -> &'static str {
        "dns"
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::{NodeId, PROTOCOL_VERSION};

    fn local() -> PeerRecord {
        PeerRecord {
            node_id: NodeId::from_bytes([1; 32]),
            service: "orders".into(),
            mesh: "m".into(),
            protocol_version: PROTOCOL_VERSION,
            addrs: Vec::new(),
        }
    }

    fn addr(last: u8) -> SocketAddr {
        ([127, 0, 0, last], 7000).into()
    }

    /// What the resolver of [`discovery`] answers, per name.
    type Answers = Arc<Mutex<std::collections::HashMap<String, io::Result<Vec<SocketAddr>>>>>;

    /// A discovery of `names` whose resolver answers from `answers`, refreshed every 100 ms.
    fn discovery(names: &[&str], answers: &Answers) -> DnsDiscovery {
        let answers = answers.clone();
        DnsDiscovery::new(names.iter().copied())
            .refresh(Duration::from_millis(100))
            .with_resolver(move |name| {
                let answer = match answers.lock().expect("answers").get(name) {
                    Some(Ok(a)) => Ok(a.clone()),
                    Some(Err(e)) => Err(io::Error::new(e.kind(), e.to_string())),
                    None => Err(io::Error::new(io::ErrorKind::NotFound, "no such name")),
                };
                async move { answer }
            })
    }

    /// New addresses become seeds, once each over all names; an address no name resolves to
    /// any more is reported gone; a name that fails keeps its addresses.
    #[tokio::test(start_paused = true)]
    async fn addresses_come_and_go_with_the_records() {
        let answers: Answers = Arc::default();
        let set = |name: &str, a: io::Result<Vec<SocketAddr>>| {
            answers.lock().expect("answers").insert(name.into(), a);
        };
        set("a.svc:7000", Ok(vec![addr(1), addr(2)]));
        set("b.svc:7000", Ok(vec![addr(2), addr(3)]));
        let (tx, mut rx) = mpsc::channel(16);
        let mut d = discovery(&["a.svc:7000", "b.svc:7000", "a.svc:7000"], &answers);
        d.start(local(), tx).expect("start");
        let mut first = Vec::new();
        for _ in 0..3 {
            first.push(rx.recv().await.expect("event"));
        }
        assert_eq!(
            first,
            [1, 2, 3].map(|i| DiscoveryEvent::Seed(addr(i))).to_vec()
        );

        // A pod goes, another comes: the next round reports both changes.
        set("a.svc:7000", Ok(vec![addr(4)]));
        assert_eq!(rx.recv().await, Some(DiscoveryEvent::SeedGone(addr(1))));
        assert_eq!(rx.recv().await, Some(DiscoveryEvent::Seed(addr(4))));

        // `b` fails to resolve: its addresses stay (2 and 3 are not gone).
        set("b.svc:7000", Err(io::Error::other("SERVFAIL")));
        tokio::time::sleep(Duration::from_millis(350)).await;
        assert!(rx.try_recv().is_err(), "a failed lookup reported a change");

        // It resolves again to fewer: only the missing one goes.
        set("b.svc:7000", Ok(vec![addr(3)]));
        assert_eq!(rx.recv().await, Some(DiscoveryEvent::SeedGone(addr(2))));
        d.stop();
    }

    /// Past [`DNS_SEED_LIMIT`] addresses are left out, and come in once others have gone.
    #[tokio::test(start_paused = true)]
    async fn the_addresses_tracked_are_bounded() {
        let many: Vec<SocketAddr> = (0..DNS_SEED_LIMIT as u16 + 5)
            .map(|p| SocketAddr::from(([127, 0, 0, 1], 1000 + p)))
            .collect();
        let answers: Answers = Arc::default();
        answers
            .lock()
            .expect("answers")
            .insert("big:7000".into(), Ok(many.clone()));
        let (tx, mut rx) = mpsc::channel(DNS_SEED_LIMIT * 2);
        let mut d = discovery(&["big:7000"], &answers);
        d.start(local(), tx).expect("start");
        let mut seeds = Vec::new();
        while seeds.len() < DNS_SEED_LIMIT {
            match rx.recv().await.expect("event") {
                DiscoveryEvent::Seed(a) => seeds.push(a),
                other => panic!("unexpected {other:?}"),
            }
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert!(rx.try_recv().is_err(), "more than the limit reported");

        // Ten go: five of them make room for the five left out.
        answers
            .lock()
            .expect("answers")
            .insert("big:7000".into(), Ok(many[10..].to_vec()));
        let mut gone = 0;
        let mut came = Vec::new();
        while gone < 10 || came.len() < 5 {
            match rx.recv().await.expect("event") {
                DiscoveryEvent::SeedGone(_) => gone += 1,
                DiscoveryEvent::Seed(a) => came.push(a),
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(came, many[DNS_SEED_LIMIT..].to_vec());
        d.stop();
    }

    #[test]
    fn names_need_a_host_and_a_port() {
        assert!(DnsDiscovery::check_name("orders.default.svc.cluster.local:7000").is_ok());
        assert!(DnsDiscovery::check_name("[::1]:7000").is_ok());
        for bad in ["orders", "orders:", ":7000", "orders:0", "orders:http"] {
            let e = DnsDiscovery::check_name(bad).expect_err(bad);
            assert!(e.contains(bad), "{e}");
        }
    }

    /// A name that is not `host:port` is refused at start, with the reason.
    #[tokio::test]
    async fn a_name_without_a_port_is_refused_at_start() {
        let (tx, _rx) = mpsc::channel(1);
        let e = DnsDiscovery::new(["orders.svc"])
            .start(local(), tx)
            .expect_err("no port");
        assert!(e.to_string().contains("orders.svc"), "{e}");
    }
}
