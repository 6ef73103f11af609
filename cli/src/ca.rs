//! `peerbus ca`: a mesh CA for membership by certificate instead of a shared mesh key.

use std::path::{Path, PathBuf};
use std::time::{Duration, UNIX_EPOCH};

use anyhow::{Context as _, Result, bail};
use peerbus::{CA_CERT_FILE, CA_CRL_FILE, CaKey, Identity, MeshCa, NodeCert, NodeId};
use peerbus_transport::write_replacing;

use crate::common::{CommonArgs, UsageError};
use crate::output::{for_services, print_line};

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
    /// Revoke node certificates the CA issued: writes the CA's revocation list (`ca.crl` in
    /// the CA's directory unless --out says otherwise). A node given it with `--mesh-crl`
    /// reads it again every minute and passes it on to its peers; every node that takes it
    /// closes its connections to the revoked nodes.
    Revoke(RevokeArgs),
    /// List the certificates the CA issued (from its record, `issued.txt`), newest last: node,
    /// serial number, expiry, whether each is valid, expired or revoked (by `ca.crl`), and the
    /// services it binds its node to (`any` when none).
    List(ListArgs),
}

#[derive(Debug, clap::Args)]
struct ListArgs {
    /// Directory of the CA (`peerbus ca new --dir`).
    #[arg(long, value_name = "DIR")]
    ca: PathBuf,
    /// One JSON object per certificate, one per line.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("what").required(true).multiple(true).args(["cert", "serial", "node_id", "renew"])))]
struct RevokeArgs {
    /// Directory of the CA (`peerbus ca new --dir`).
    #[arg(long, value_name = "DIR")]
    ca: PathBuf,
    /// A certificate file to revoke (repeatable).
    #[arg(long, value_name = "FILE")]
    cert: Vec<PathBuf>,
    /// The serial number of a certificate to revoke, in hex (repeatable).
    #[arg(long, value_name = "HEX")]
    serial: Vec<String>,
    /// Revoke every certificate this CA issued for the node (as recorded in the CA
    /// directory's `issued.txt` by `peerbus ca issue`; repeatable).
    #[arg(long, value_name = "ID")]
    node_id: Vec<NodeId>,
    /// The revocation list to write [default: ca.crl in the CA's directory]. What it revokes
    /// already stays revoked.
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
    /// Write the list anew with nothing more revoked: a new number and next update, for a
    /// list that is past (or near) its next update.
    #[arg(long)]
    renew: bool,
    /// How long the new list says it stays current (its next update; 1s to 3650d). Nodes
    /// still use a list past it, but flag it in their status, page and metrics.
    #[arg(long, value_name = "DUR", default_value = "365d", value_parser = humantime::parse_duration)]
    next_update: Duration,
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
    /// Bind the certificate to this service (repeatable): its node may run only a service
    /// named here, and its peers refuse it when it claims another, so a member cannot take
    /// another service's messages. Without it, the node may run any service.
    #[arg(long, value_name = "NAME")]
    service: Vec<String>,
}

pub(crate) fn run(common: &CommonArgs, args: &CaArgs) -> Result<()> {
    match &args.command {
        CaCommand::New(a) => new(&common.mesh, a),
        CaCommand::Issue(a) => issue(a),
        CaCommand::Request(a) => request(common, a),
        CaCommand::Revoke(a) => revoke(a),
        CaCommand::List(a) => list(a),
    }
}

fn new(mesh: &str, args: &NewArgs) -> Result<()> {
    let name = args.name.as_deref().unwrap_or(mesh);
    CaKey::create(&args.dir, name)
        .with_context(|| format!("could not create a mesh CA in {}", args.dir.display()))?;
    print_line(&format!(
        "created mesh CA \"{name}\" in {dir}: {dir}/ca.key is its signing key (keep it off the \
         nodes), {dir}/ca.crt is what every node trusts (--mesh-ca), {dir}/ca.crl its \
         revocation list, empty (--mesh-crl; `peerbus ca revoke` adds to it)",
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
    let services: Vec<&str> = args.service.iter().map(String::as_str).collect();
    let pem = ca
        .issue_for_services(&node, valid_for, &services)
        .with_context(|| format!("could not issue a certificate for node {node}"))?;
    write_replacing(&args.out, pem.as_bytes())
        .with_context(|| format!("could not write {}", args.out.display()))?;
    let issued = NodeCert::from_pem("the issued certificate", pem.as_bytes())
        .context("the issued certificate does not read back")?;
    let until = issued.not_after();
    record_issued(&args.ca, &issued)?;
    print_line(&format!(
        "issued a certificate for node {node} valid until {}{}: {}",
        humantime::format_rfc3339_seconds(until),
        for_services(issued.services()),
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

/// The record of what a CA issued, in its directory: a line per certificate, its serial
/// number, node id and expiry, tab-separated (`peerbus ca revoke --node-id` reads it).
const ISSUED_FILE: &str = "issued.txt";

/// The most lines of [`ISSUED_FILE`] read: a CA that issued more is revoked from by serial
/// or certificate file.
const MAX_ISSUED: usize = 1_000_000;

fn record_issued(ca: &Path, cert: &NodeCert) -> Result<()> {
    use std::io::Write as _;
    let path = ca.join(ISSUED_FILE);
    let line = format!(
        "{}\t{}\t{}\t{}\n",
        cert.serial(),
        cert.node_id(),
        humantime::format_rfc3339_seconds(cert.not_after()),
        cert.services().join(",")
    );
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .and_then(|mut f| f.write_all(line.as_bytes()))
        .with_context(|| format!("could not record the certificate in {}", path.display()))
}

/// One line of a CA's record of what it issued.
struct Issued {
    serial: String,
    node: String,
    not_after: String,
    /// The services the certificate binds its node to; empty: any (so are the lines
    /// recorded before certificates could be bound, which have no such field).
    services: Vec<String>,
}

/// The certificates the CA in `ca` issued, from its record (at most [`MAX_ISSUED`]; none
/// when it has no record yet).
fn issued(ca: &Path) -> Result<Vec<Issued>> {
    use std::io::BufRead as _;
    let path = ca.join(ISSUED_FILE);
    let file = match std::fs::File::open(&path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("could not read {}", path.display())),
    };
    let mut all = Vec::new();
    for line in std::io::BufReader::new(file).lines().take(MAX_ISSUED) {
        let line = line.with_context(|| format!("could not read {}", path.display()))?;
        let mut fields = line.split('\t').map(str::to_string);
        if let (Some(serial), Some(node), Some(not_after)) =
            (fields.next(), fields.next(), fields.next())
        {
            let services = fields
                .next()
                .map(|s| {
                    s.split(',')
                        .filter(|n| !n.is_empty())
                        .map(str::to_string)
                        .collect()
                })
                .unwrap_or_default();
            all.push(Issued {
                serial,
                node,
                not_after,
                services,
            });
        }
    }
    Ok(all)
}

/// The serial numbers of the certificates the CA in `ca` issued for `node`, from its record.
fn issued_for(ca: &Path, node: &NodeId) -> Result<Vec<String>> {
    let id = node.to_string();
    Ok(issued(ca)?
        .into_iter()
        .filter(|i| i.node == id)
        .map(|i| i.serial)
        .collect())
}

fn list(args: &ListArgs) -> Result<()> {
    let mut trust = MeshCa::load(&args.ca.join(CA_CERT_FILE))
        .with_context(|| format!("could not load the mesh CA in {}", args.ca.display()))?;
    let crl = args.ca.join(CA_CRL_FILE);
    if crl.exists() {
        trust = trust.with_revocation_list_file(&crl)?;
    }
    let now = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    let rows: Vec<(Issued, &str)> = issued(&args.ca)?
        .into_iter()
        .map(|i| {
            // RFC 3339 times in UTC, all to the second: their text orders as they do.
            let state = if trust.revokes(&i.serial) {
                "revoked"
            } else if i.not_after < now {
                "expired"
            } else {
                "valid"
            };
            (i, state)
        })
        .collect();
    if args.json {
        for (i, state) in &rows {
            let row = serde_json::json!({
                "node_id": i.node, "serial": i.serial, "not_after": i.not_after, "state": state,
                "services": i.services,
            });
            print_line(&row.to_string())?;
        }
        return Ok(());
    }
    if rows.is_empty() {
        return print_line(&format!(
            "{} records no certificate yet (`peerbus ca issue`)",
            args.ca.join(ISSUED_FILE).display()
        ));
    }
    let mut out = format!(
        "{:<52}  {:<32}  {:<20}  {:<8}  SERVICES\n",
        "NODE", "SERIAL", "EXPIRES", "STATE"
    );
    for (i, state) in &rows {
        let services = match i.services.as_slice() {
            [] => "any".to_string(),
            names => names.join(","),
        };
        out.push_str(&format!(
            "{:<52}  {:<32}  {:<20}  {state:<8}  {services}\n",
            i.node, i.serial, i.not_after
        ));
    }
    print_line(out.trim_end())
}

fn revoke(args: &RevokeArgs) -> Result<()> {
    let ca = CaKey::load(&args.ca)
        .with_context(|| format!("could not load the mesh CA in {}", args.ca.display()))?;
    let trust = ca.trust()?;
    let mut serials = args.serial.clone();
    for file in &args.cert {
        let cert = NodeCert::load(file)?;
        // Checked at its last valid second: an expired certificate may be revoked too.
        let at = cert.not_after() - Duration::from_secs(1);
        if let Err(why) = trust.check(cert.der().as_ref(), at) {
            bail!("{} is not a certificate of this CA: {why}", file.display());
        }
        serials.push(cert.serial());
    }
    for node in &args.node_id {
        let issued = issued_for(&args.ca, node)?;
        if issued.is_empty() {
            bail!(
                "{} records no certificate this CA issued for node {node}: revoke it by \
                 --cert or --serial",
                args.ca.join(ISSUED_FILE).display()
            );
        }
        serials.extend(issued);
    }
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| args.ca.join(CA_CRL_FILE));
    let list = ca
        .revoke_continuing(&out, serials.iter().map(String::as_str), args.next_update)
        .with_context(|| format!("could not write the revocation list {}", out.display()))?;
    let read_back = trust
        .with_revocation_lists("the new revocation list", list.as_bytes())
        .context("the new revocation list does not read back")?;
    let revoked = read_back.revoked();
    write_replacing(&out, list.as_bytes())
        .with_context(|| format!("could not write {}", out.display()))?;
    // As the list itself says it.
    let next = read_back
        .revocation_list_info()
        .first()
        .and_then(|l| l.next_update)
        .map_or_else(
            || "none".to_string(),
            |secs| {
                humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(secs))
                    .to_string()
            },
        );
    print_line(&format!(
        "{}; {} now revokes {revoked}, next update {next}: a node given it with --mesh-crl \
         reads it again within a minute (at once with `peerbus reload` there) and passes it on \
         to its peers (protocol 8), each of which checks its connections again",
        match serials.len() {
            0 => "renewed the revocation list".to_string(),
            1 => format!("revoked 1 certificate (serial {})", serials[0]),
            n => format!("revoked {n} certificates (serial {})", serials.join(", ")),
        },
        out.display()
    ))
}
