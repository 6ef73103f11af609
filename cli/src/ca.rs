//! `peerbus ca`: a mesh CA for membership by certificate instead of a shared mesh key.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use peerbus::{CaKey, Identity, NodeCert, NodeId};

use crate::common::{CommonArgs, UsageError};
use crate::output::print_line;

/// `peerbus ca`.
#[derive(Debug, clap::Args)]
pub(crate) struct CaArgs {
    #[command(subcommand)]
    command: CaCommand,
}

#[derive(Debug, clap::Subcommand)]
enum CaCommand {
    /// Create a mesh CA in a directory: `ca.key`, its signing key (mode 0600; keep it off
    /// the nodes), and `ca.crt`, the certificate every node trusts (`--mesh-ca`). Never
    /// overwrites.
    New(NewArgs),
    /// Issue a node's certificate (`--mesh-cert`) for its node id, signed by the CA.
    Issue(IssueArgs),
    /// Write a certificate signing request (PKCS#10) for the node in --data-dir (its identity
    /// is created if it has none), for the CA of an existing PKI to sign (`openssl x509
    /// -req`, Vault, step-ca, cert-manager): the certificate it returns is the node's
    /// `--mesh-cert`, and that CA's certificate goes in `--mesh-ca`. The node's key stays in
    /// --data-dir.
    Request(RequestArgs),
}

#[derive(Debug, clap::Args)]
struct RequestArgs {
    /// File to write the request to (PEM).
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
}

#[derive(Debug, clap::Args)]
struct NewArgs {
    /// Directory to create the CA in.
    #[arg(long, value_name = "DIR")]
    dir: PathBuf,
    /// Name written in the CA certificate (for people reading it) [default: the mesh name].
    #[arg(long)]
    name: Option<String>,
}

#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("node").required(true).args(["node_id", "node_data_dir"])))]
struct IssueArgs {
    /// Directory of the CA (`peerbus ca new --dir`).
    #[arg(long, value_name = "DIR")]
    ca: PathBuf,
    /// The node id to issue the certificate for (a node prints it at start).
    #[arg(long, value_name = "ID")]
    node_id: Option<NodeId>,
    /// The node's data directory: its identity is read there, or created if it has none yet
    /// (to provision a node before its first start).
    #[arg(long = "for-data-dir", value_name = "DIR")]
    node_data_dir: Option<PathBuf>,
    /// Days the certificate is valid. A node refuses peers whose certificate expired, so
    /// this is how long a node may stay in the mesh without a new one.
    #[arg(long, default_value_t = 90)]
    days: u64,
    /// File to write the certificate to (PEM). An existing file is replaced, so that a node's
    /// certificate can be renewed in place.
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
}

pub(crate) fn run(common: &CommonArgs, args: &CaArgs) -> Result<()> {
    match &args.command {
        CaCommand::New(a) => new(&common.mesh, a),
        CaCommand::Issue(a) => issue(a),
        CaCommand::Request(a) => request(common, a),
    }
}

fn new(mesh: &str, args: &NewArgs) -> Result<()> {
    let name = args.name.as_deref().unwrap_or(mesh);
    CaKey::create(&args.dir, name)
        .with_context(|| format!("could not create a mesh CA in {}", args.dir.display()))?;
    print_line(&format!(
        "created mesh CA \"{name}\" in {dir}: {dir}/ca.key is its signing key (keep it off the \
         nodes), {dir}/ca.crt is what every node trusts (--mesh-ca)",
        dir = args.dir.display()
    ))
}

fn issue(args: &IssueArgs) -> Result<()> {
    let node = match (&args.node_id, &args.node_data_dir) {
        (Some(id), _) => *id,
        (None, Some(dir)) => Identity::load_or_create(dir)
            .with_context(|| format!("no node identity in {}", dir.display()))?
            .node_id(),
        (None, None) => bail!(UsageError("--node-id or --for-data-dir is required".into())),
    };
    if args.days == 0 {
        bail!(UsageError("--days must be at least 1".into()));
    }
    let valid_for = Duration::from_secs(args.days.saturating_mul(86_400));
    let ca = CaKey::load(&args.ca)
        .with_context(|| format!("could not load the mesh CA in {}", args.ca.display()))?;
    let pem = ca
        .issue(&node, valid_for)
        .with_context(|| format!("could not issue a certificate for node {node}"))?;
    write_replacing(&args.out, pem.as_bytes())
        .with_context(|| format!("could not write {}", args.out.display()))?;
    let until = NodeCert::from_pem("the issued certificate", pem.as_bytes())
        .context("the issued certificate does not read back")?
        .not_after();
    print_line(&format!(
        "issued a certificate for node {node} valid until {}: {}",
        humantime::format_rfc3339_seconds(until),
        args.out.display()
    ))
}

fn request(common: &CommonArgs, args: &RequestArgs) -> Result<()> {
    let Some(dir) = &common.data_dir else {
        bail!(UsageError(
            "--data-dir is required: the request is for the key of the node kept there".into()
        ));
    };
    let identity = Identity::load_or_create(dir)
        .with_context(|| format!("no node identity in {}", dir.display()))?;
    let pem = peerbus::certificate_request(&identity)
        .context("could not write the certificate signing request")?;
    write_replacing(&args.out, pem.as_bytes())
        .with_context(|| format!("could not write {}", args.out.display()))?;
    print_line(&format!(
        "wrote a certificate signing request for node {}: {} (have your CA sign it; start \
         the node with --mesh-cert set to the certificate and --mesh-ca to the CA's)",
        identity.node_id(),
        args.out.display()
    ))
}

/// Writes `bytes` to a file beside `path` and renames it into place, so that a node reading
/// the certificate never sees half of it.
fn write_replacing(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}
