//! Options every command shares, logging, and signal handling.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context as _, Result, bail};
use clap::ArgAction;
use clap::builder::BoolishValueParser;
use peerbus::{Interfaces, Node, NodeBuilder};

/// Service name of the short-lived nodes that one-shot commands (`send`, `req`, `peers` …)
/// start.
pub(crate) const CLI_SERVICE: &str = "peerbus-cli";

/// An error in the command line found after parsing (exit code 2, like clap's own).
#[derive(Debug)]
pub(crate) struct UsageError(pub(crate) String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

/// How to join the mesh. Each option can also come from the environment.
#[derive(Clone, Debug, clap::Args)]
#[command(next_help_heading = "Mesh options (also read from the environment)")]
pub(crate) struct CommonArgs {
    /// Mesh name: nodes only see peers of the same mesh.
    #[arg(long, global = true, env = "PEERBUS_MESH", default_value = "default")]
    pub(crate) mesh: String,

    /// File holding the mesh key every member proves it has (create it with `peerbus keygen`).
    /// While the key is rotated it holds more keys, one per line: the node proves the first
    /// and accepts any of them.
    #[arg(
        long,
        global = true,
        env = "PEERBUS_MESH_KEY_FILE",
        value_name = "PATH",
        conflicts_with = "insecure_open_mesh"
    )]
    pub(crate) mesh_key_file: Option<PathBuf>,

    /// File of the mesh CA's certificate (`ca.crt` of `peerbus ca new`): peers must present
    /// a certificate it signed. Membership by CA instead of a mesh key; needs --mesh-cert.
    #[arg(
        long,
        global = true,
        env = "PEERBUS_MESH_CA",
        value_name = "PATH",
        requires = "mesh_cert",
        conflicts_with_all = ["mesh_key_file", "insecure_open_mesh"]
    )]
    pub(crate) mesh_ca: Option<PathBuf>,

    /// File of this node's certificate from the mesh CA (`peerbus ca issue`), for the
    /// identity in --data-dir.
    #[arg(
        long,
        global = true,
        env = "PEERBUS_MESH_CERT",
        value_name = "PATH",
        requires = "mesh_ca"
    )]
    pub(crate) mesh_cert: Option<PathBuf>,

    /// File of the mesh CA's revocation lists (`ca.crl` of `peerbus ca revoke`, or the PEM
    /// CRL of another PKI's CA): peers whose certificates it revokes are refused. Read again
    /// every minute, like the CA and certificate files, and passed on to peers: one node given
    /// a new list is enough, and nodes without this option take lists from their peers.
    #[arg(
        long,
        global = true,
        env = "PEERBUS_MESH_CRL",
        value_name = "PATH",
        requires = "mesh_ca"
    )]
    pub(crate) mesh_crl: Option<PathBuf>,

    /// Run without a mesh key: any node that finds this one may exchange messages with it.
    /// Only for demos and trusted networks.
    #[arg(
        long,
        global = true,
        env = "PEERBUS_INSECURE_OPEN_MESH",
        action = ArgAction::SetTrue,
        value_parser = BoolishValueParser::new()
    )]
    pub(crate) insecure_open_mesh: bool,

    /// Interfaces mDNS runs on: `all` (every non-loopback interface), `loopback`, or
    /// interface names such as `eth0,eth1`.
    #[arg(
        long,
        global = true,
        env = "PEERBUS_INTERFACE",
        default_value = "all",
        value_name = "all|loopback|NAME[,NAME…]"
    )]
    pub(crate) interface: Interfaces,

    /// QUIC listen address [default: 127.0.0.1:0 with `--interface loopback`, else 0.0.0.0:0].
    #[arg(long, global = true, env = "PEERBUS_LISTEN", value_name = "ADDR")]
    pub(crate) listen: Option<SocketAddr>,

    /// Directory for the node identity and its durable log [default: none: a fresh identity,
    /// messages kept in memory only].
    #[arg(long, global = true, env = "PEERBUS_DATA_DIR", value_name = "DIR")]
    pub(crate) data_dir: Option<PathBuf>,

    /// Address of a node to dial directly, for networks without multicast (repeatable;
    /// PEERBUS_SEEDS takes a comma-separated list).
    #[arg(
        long = "seed",
        global = true,
        env = "PEERBUS_SEEDS",
        value_delimiter = ',',
        value_name = "ADDR"
    )]
    pub(crate) seeds: Vec<SocketAddr>,

    /// A DNS name whose addresses are seeds, resolved every 10 s: a Kubernetes headless
    /// service, or any name with a record per node (repeatable; PEERBUS_DNS_SEEDS takes a
    /// comma-separated list). The port is the one the nodes listen on: give them a fixed
    /// `--listen`.
    #[arg(
        long = "dns-seed",
        global = true,
        env = "PEERBUS_DNS_SEEDS",
        value_delimiter = ',',
        value_name = "HOST:PORT",
        value_parser = dns_seed
    )]
    pub(crate) dns_seeds: Vec<String>,

    /// Send messages that are not part of a trace without a `traceparent` header, instead of
    /// starting a new trace for each. Messages sent inside a trace (a handler's onward sends)
    /// still carry one.
    #[arg(
        long,
        global = true,
        env = "PEERBUS_NO_NEW_TRACES",
        action = ArgAction::SetTrue,
        value_parser = BoolishValueParser::new()
    )]
    pub(crate) no_new_traces: bool,
}

impl CommonArgs {
    /// A node builder for `service` configured from these options.
    pub(crate) fn builder(&self, service: &str) -> Result<NodeBuilder> {
        let mut b = Node::builder(service)
            .mesh(&self.mesh)
            .interfaces(self.interface.clone());
        if let (Some(ca), Some(cert)) = (&self.mesh_ca, &self.mesh_cert) {
            b = b.mesh_ca_files(ca, cert);
        }
        if let Some(crl) = &self.mesh_crl {
            b = b.mesh_crl_file(crl);
        }
        match (&self.mesh_key_file, self.insecure_open_mesh) {
            (Some(_), true) => bail!(UsageError(
                "--mesh-key-file (PEERBUS_MESH_KEY_FILE) and --insecure-open-mesh \
                 (PEERBUS_INSECURE_OPEN_MESH) exclude each other; choose one"
                    .into()
            )),
            (Some(path), false) => b = b.mesh_key_file(path),
            (None, true) => b = b.insecure_open_mesh(),
            // `start()` explains how to choose.
            (None, false) => {}
        }
        if let Some(addr) = self.listen {
            b = b.listen(addr);
        }
        if let Some(dir) = &self.data_dir {
            b = b.data_dir(dir);
        }
        for seed in &self.seeds {
            b = b.seed(*seed);
        }
        for name in &self.dns_seeds {
            b = b.dns_seed(name);
        }
        if self.no_new_traces {
            b = b.start_traces(false);
        }
        Ok(b)
    }

    /// Starts a node for `service`.
    pub(crate) async fn start(&self, service: &str) -> Result<Node> {
        let node = self
            .builder(service)?
            .start()
            .await
            .with_context(|| format!("could not start a node for service `{service}`"))?;
        tracing::debug!(node = %node.id(), service, listen = %node.local_addr(), "node started");
        Ok(node)
    }
}

/// Logs to stderr, filtered by `RUST_LOG` or else `default` (a level such as `info`).
pub(crate) fn init_logging(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

/// Resolves on Ctrl-C or, on Unix, SIGTERM.
pub(crate) async fn shutdown_signal() -> Result<()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).context("could not watch SIGTERM")?;
        tokio::select! {
            r = tokio::signal::ctrl_c() => r.context("could not watch Ctrl-C")?,
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    tokio::signal::ctrl_c()
        .await
        .context("could not watch Ctrl-C")?;
    Ok(())
}

/// Parses a `--dns-seed`: `host:port`.
fn dns_seed(s: &str) -> Result<String, String> {
    peerbus::DnsDiscovery::check_name(s)?;
    Ok(s.to_string())
}
