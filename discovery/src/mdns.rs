//! Multicast DNS discovery (mdns-sd).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr, SocketAddrV6};

use mdns_sd::{
    IfKind, MDNS_PORT, ResolvedService, ScopedIp, ServiceDaemon, ServiceEvent, ServiceInfo,
};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::Instrument;

use crate::pending::Pending;
use crate::txt::{self, check_local};
use crate::{
    Discovery, DiscoveryError, DiscoveryEvent, Interfaces, NodeId, PeerRecord, SERVICE_TYPE,
    runtime,
};

/// The most peers one [`MdnsDiscovery`] tracks; announcements of further peers
/// are ignored (with a warning) until some go down.
pub const MDNS_PEER_LIMIT: usize = 4096;

/// Discovery by multicast DNS on the chosen [`Interfaces`].
///
/// Announces `<node id>._peerbus._udp.local.` with the local record's first
/// port, the IPs of its addresses (all interface addresses when one is
/// unspecified, e.g. `0.0.0.0`) and TXT `v`, `id`, `svc`, `mesh`. Reports peers
/// of the same mesh; peers of other meshes, the local node and announcements
/// whose TXT does not parse are ignored (logged at debug level).
///
/// Each instance runs its own mdns-sd daemon (a thread and sockets bound to
/// `0.0.0.0:5353` and `[::]:5353` with `SO_REUSEPORT`), so several nodes in one
/// process or on one host work side by side.
///
/// [`DiscoveryEvent::Down`] follows an mDNS goodbye or the expiry of a peer's
/// records (its TTL, 75 minutes for a peer that vanished without a goodbye); it
/// is a hint. A peer that comes back is reported `Up` again.
#[derive(Debug)]
pub struct MdnsDiscovery {
    interfaces: Interfaces,
    running: Option<Running>,
}

struct Running {
    daemon: ServiceDaemon,
    fullname: String,
    task: JoinHandle<()>,
}

impl std::fmt::Debug for Running {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Running")
            .field("fullname", &self.fullname)
            .finish_non_exhaustive()
    }
}

impl MdnsDiscovery {
    /// A discovery on `interfaces`; nothing happens before [`Discovery::start`].
    pub fn new(interfaces: Interfaces) -> Self {
        Self {
            interfaces,
            running: None,
        }
    }
}

/// The interface selection for mdns-sd, applied before any socket joins the
/// mDNS group (see `discovery/vendor/mdns-sd/PEERBUS.md`).
fn selections(interfaces: &Interfaces) -> Vec<(IfKind, bool)> {
    match interfaces {
        Interfaces::All => vec![(IfKind::LoopbackV4, false), (IfKind::LoopbackV6, false)],
        Interfaces::Loopback => vec![(IfKind::All, false), (IfKind::LoopbackV4, true)],
        Interfaces::Named(names) => std::iter::once((IfKind::All, false))
            .chain(names.iter().map(|n| (IfKind::Name(n.clone()), true)))
            .collect(),
    }
}

/// Warns when the selected interfaces are not there (yet): mdns-sd then runs
/// silently on nothing until they come up.
fn warn_if_missing(interfaces: &Interfaces) {
    let present = match if_addrs::get_if_addrs() {
        Ok(present) => present,
        Err(e) => {
            tracing::debug!(error = %e, "cannot list network interfaces");
            return;
        }
    };
    let up = |want: &dyn Fn(&if_addrs::Interface) -> bool| {
        present.iter().any(|i| i.is_oper_up() && want(i))
    };
    match interfaces {
        Interfaces::All => {}
        Interfaces::Loopback => {
            if !up(&|i| i.is_loopback() && i.ip().is_ipv4()) {
                tracing::warn!(
                    "no IPv4 loopback interface is up, so mDNS finds nobody until one is \
                     (in a fresh network namespace run `ip link set lo up`)"
                );
            }
        }
        Interfaces::Named(names) => {
            for name in names {
                if !up(&|i| i.name == *name) {
                    tracing::warn!(interface = %name, "no such interface is up; mDNS skips it until it is");
                }
            }
        }
    }
}

/// The port and IPs to announce for `addrs`, and whether to announce the
/// interface addresses instead (an unspecified IP).
fn announced_addrs(addrs: &[SocketAddr]) -> Result<(u16, Vec<IpAddr>, bool), DiscoveryError> {
    let first = addrs.first().ok_or_else(|| {
        DiscoveryError::InvalidRecord("the local record has no address to announce".into())
    })?;
    let port = first.port();
    if port == 0 {
        return Err(DiscoveryError::InvalidRecord(format!(
            "cannot announce port 0 ({first}); pass the bound address of the endpoint"
        )));
    }
    let mut ips = Vec::new();
    let mut auto = false;
    for addr in addrs {
        if addr.port() != port {
            tracing::warn!(%addr, port, "mDNS announces one port; ignoring an address with another");
            continue;
        }
        if addr.ip().is_unspecified() {
            auto = true;
        } else if !ips.contains(&addr.ip()) {
            ips.push(addr.ip());
        }
    }
    Ok((port, ips, auto))
}

impl Discovery for MdnsDiscovery {
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
        let (port, ips, auto) = announced_addrs(&local.addrs)?;
        if self.interfaces == Interfaces::Loopback
            && let Some(ip) = ips.iter().find(|ip| !ip.is_loopback())
        {
            tracing::warn!(%ip, "announcing a non-loopback address on the loopback interface");
        }

        let instance = local.node_id.to_string();
        let host = format!("{instance}.local.");
        let properties = txt::properties(&local);
        let mut info = ServiceInfo::new(
            SERVICE_TYPE,
            &instance,
            &host,
            &ips[..],
            port,
            &properties[..],
        )
        .map_err(|e| DiscoveryError::InvalidRecord(e.to_string()))?;
        if auto {
            info = info.enable_addr_auto();
        }
        // Probing (RFC 6762 §8.1) spends about a second making sure no other host claims the
        // name before announcing it. The instance and host names here are the node id, an
        // ed25519 public key: no other node can hold them, and a second process with the
        // same identity is one node (its store's lock refuses it; the mesh proof and the
        // pinned certificate keep impostors out whatever mDNS says). So the records are
        // announced at once, and a new node is found in milliseconds instead of about a second.
        info.set_requires_probe(false);
        let fullname = info.get_fullname().to_owned();

        warn_if_missing(&self.interfaces);
        let daemon = ServiceDaemon::new_with_interfaces(MDNS_PORT, selections(&self.interfaces))
            .map_err(|e| DiscoveryError::Mdns(e.to_string()))?;
        let browse = (|| {
            if self.interfaces == Interfaces::Loopback {
                // On by default; nodes on one host only see each other with it.
                daemon.set_multicast_loop_v4(true)?;
            }
            let receiver = daemon.browse(SERVICE_TYPE)?;
            daemon.register(info)?;
            Ok::<_, mdns_sd::Error>(receiver)
        })();
        let receiver = match browse {
            Ok(receiver) => receiver,
            Err(e) => {
                let _ = daemon.shutdown();
                return Err(DiscoveryError::Mdns(e.to_string()));
            }
        };

        tracing::info!(
            node = %local.node_id.short(),
            interfaces = %self.interfaces,
            port,
            ?ips,
            "mDNS discovery started"
        );
        let span = tracing::debug_span!("discovery", kind = "mdns", node = %local.node_id.short());
        let browser = Browser {
            local_id: local.node_id,
            mesh: local.mesh,
            reported: HashMap::new(),
            pending: Pending::default(),
        };
        let task = handle.spawn(browser.run(receiver, events).instrument(span));
        self.running = Some(Running {
            daemon,
            fullname,
            task,
        });
        Ok(())
    }

    fn stop(&mut self) {
        let Some(running) = self.running.take() else {
            return;
        };
        // The daemon runs commands in order: the goodbye goes out before it exits.
        if let Err(e) = running.daemon.unregister(&running.fullname) {
            tracing::debug!(error = %e, "mDNS unregister failed");
        }
        if let Err(e) = running.daemon.shutdown() {
            tracing::debug!(error = %e, "mDNS shutdown failed");
        }
        running.task.abort();
        tracing::debug!("mDNS discovery stopped");
    }

    fn name(&self) -> &'static str {
        "mdns"
    }
}

impl Drop for MdnsDiscovery {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Turns mdns-sd events into [`DiscoveryEvent`]s.
struct Browser {
    local_id: NodeId,
    mesh: String,
    /// The last record reported `Up` per peer, at most [`MDNS_PEER_LIMIT`].
    reported: HashMap<NodeId, PeerRecord>,
    pending: Pending,
}

impl Browser {
    /// Drains mdns-sd's channel promptly (it ends the subscription when full)
    /// while delivering coalesced events as `events` has space.
    async fn run(
        mut self,
        receiver: mdns_sd::Receiver<ServiceEvent>,
        events: mpsc::Sender<DiscoveryEvent>,
    ) {
        let mut browsing = true;
        while browsing || !self.pending.is_empty() {
            tokio::select! {
                event = receiver.recv_async(), if browsing => match event {
                    Ok(event) => self.handle(event),
                    Err(_) => {
                        tracing::debug!("mDNS browse channel closed");
                        browsing = false;
                    }
                },
                permit = events.reserve(), if !self.pending.is_empty() => match permit {
                    Ok(permit) => {
                        if let Some(event) = self.pending.pop() {
                            tracing::debug!(?event, "mDNS discovery event");
                            permit.send(event);
                        }
                    }
                    Err(_) => return,
                },
            }
        }
    }

    fn handle(&mut self, event: ServiceEvent) {
        match event {
            ServiceEvent::ServiceResolved(service) => self.resolved(&service),
            ServiceEvent::ServiceRemoved(_, fullname) => {
                let Some(id) = txt::instance_id(&fullname) else {
                    return;
                };
                if self.reported.remove(&id).is_some() {
                    self.pending.push(id, DiscoveryEvent::Down(id));
                }
            }
            other => tracing::trace!(event = ?other, "mDNS event"),
        }
    }

    fn resolved(&mut self, service: &ResolvedService) {
        let fullname = service.get_fullname();
        let parsed = match txt::parse(|key| service.get_property_val_str(key)) {
            Ok(parsed) => parsed,
            Err(e) => {
                tracing::debug!(%fullname, reason = %e, "ignoring an mDNS announcement");
                return;
            }
        };
        if txt::instance_id(fullname) != Some(parsed.node_id) {
            tracing::debug!(%fullname, id = %parsed.node_id, "ignoring an mDNS announcement whose name is not its id");
            return;
        }
        if parsed.node_id == self.local_id {
            return;
        }
        if parsed.mesh != self.mesh {
            tracing::debug!(peer = %parsed.node_id.short(), mesh = %parsed.mesh, "ignoring a peer of another mesh");
            return;
        }
        let mut addrs: Vec<SocketAddr> = service
            .get_addresses()
            .iter()
            .map(|ip| socket_addr(ip, service.port))
            .collect();
        addrs.sort();
        addrs.dedup();
        if addrs.is_empty() {
            return;
        }
        let record = PeerRecord {
            node_id: parsed.node_id,
            service: parsed.service,
            mesh: parsed.mesh,
            protocol_version: parsed.protocol_version,
            addrs,
        };
        match self.reported.get(&record.node_id) {
            Some(previous) if *previous == record => return,
            None if self.reported.len() >= MDNS_PEER_LIMIT => {
                tracing::warn!(peer = %record.node_id.short(), limit = MDNS_PEER_LIMIT, "too many mDNS peers; ignoring one more");
                return;
            }
            _ => {}
        }
        self.reported.insert(record.node_id, record.clone());
        self.pending
            .push(record.node_id, DiscoveryEvent::Up(record));
    }
}

/// A dialable address; IPv6 link-local addresses keep their interface.
fn socket_addr(ip: &ScopedIp, port: u16) -> SocketAddr {
    match ip {
        ScopedIp::V6(v6) if v6.addr().is_unicast_link_local() => {
            SocketAddr::V6(SocketAddrV6::new(*v6.addr(), port, 0, v6.scope_id().index))
        }
        other => SocketAddr::new(other.to_ip_addr(), port),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn announced_addresses() {
        let a = |s: &str| s.parse::<SocketAddr>().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            announced_addrs(&[a("127.0.0.1:4000")]).ok(),
            Some((
                4000,
                vec!["127.0.0.1".parse().unwrap_or_else(|e| panic!("{e}"))],
                false
            ))
        );
        assert_eq!(
            announced_addrs(&[a("0.0.0.0:4000")]).ok(),
            Some((4000, vec![], true))
        );
        assert!(announced_addrs(&[]).is_err());
        assert!(announced_addrs(&[a("127.0.0.1:0")]).is_err());
        assert_eq!(
            announced_addrs(&[a("127.0.0.1:4000"), a("127.0.0.2:4001")]).ok(),
            Some((
                4000,
                vec!["127.0.0.1".parse().unwrap_or_else(|e| panic!("{e}"))],
                false
            ))
        );
    }

    #[test]
    fn loopback_selection_never_enables_other_interfaces() {
        let sel = selections(&Interfaces::Loopback);
        assert!(matches!(sel[0], (IfKind::All, false)));
        assert!(
            sel[1..]
                .iter()
                .all(|(k, on)| matches!(k, IfKind::LoopbackV4) && *on)
        );
    }
}
