//! A node's mesh certificate while it runs (membership by a mesh CA): how long it is valid,
//! and a renewed certificate or a new CA file taken without a restart.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use peerbus_transport::{CaError, MeshCa, NodeCert};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{Span, info, warn};

use super::Shared;
use super::revocations::News;

/// How often a node reads its certificate and CA files again by default
/// ([`NodeBuilder::mesh_cert_check_every`](crate::NodeBuilder::mesh_cert_check_every)).
pub(crate) const CHECK_EVERY: Duration = Duration::from_secs(60);

/// A certificate that ends sooner than this is warned about, at start and when renewed.
const EXPIRY_WARNING: Duration = Duration::from_secs(7 * 86_400);

/// Reloads asked for ([`Node::reload_mesh_files`](crate::Node::reload_mesh_files)) and not
/// yet looked at: one look answers every request queued before it began, so more callers
/// than this only wait for room.
pub(crate) const RELOAD_QUEUE: usize = 4;

/// A request to read the mesh CA files now, answered with what was found.
pub(crate) type ReloadRequest = oneshot::Sender<MeshReload>;

/// What [`Node::reload_mesh_files`](crate::Node::reload_mesh_files) found in a node's mesh
/// files, each compared with the one in use; `None` for a file the node does not have.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MeshReload {
    /// The CA certificate file with its revocation lists (`--mesh-ca`, `--mesh-crl`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<FileOutcome>,
    /// This node's certificate file (`--mesh-cert`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<FileOutcome>,
    /// The mesh key file (`--mesh-key-file`): its first key proven, every key accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<FileOutcome>,
}

impl MeshReload {
    /// Each file the node has, with a name for people and what became of it.
    pub fn files(&self) -> impl Iterator<Item = (&'static str, &FileOutcome)> {
        [
            ("mesh CA file and revocation lists", &self.ca),
            ("this node's certificate", &self.certificate),
            ("mesh key file", &self.key_file),
        ]
        .into_iter()
        .filter_map(|(name, outcome)| outcome.as_ref().map(|o| (name, o)))
    }
}

impl std::fmt::Display for MeshReload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, (name, outcome)) in self.files().enumerate() {
            write!(f, "{}{name}: {outcome}", if i == 0 { "" } else { "; " })?;
        }
        Ok(())
    }
}

/// What a node did with one of its mesh CA files when it read it again.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FileOutcome {
    /// It holds what the node uses already.
    Unchanged,
    /// It changed, and the node uses it from now on (live connections were checked again
    /// against a new CA file or list).
    Taken,
    /// It changed or could not be read, and the node keeps the one in use: why.
    Refused(String),
}

impl std::fmt::Display for FileOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unchanged => f.write_str("unchanged"),
            Self::Taken => f.write_str("taken"),
            Self::Refused(why) => write!(f, "refused: {why}"),
        }
    }
}

/// Logs how long `cert` is valid: a warning when it ends within a week.
pub(crate) fn report(span: &Span, cert: &NodeCert, what: &str) {
    let left = cert
        .not_after()
        .duration_since(SystemTime::now())
        .unwrap_or_default();
    let hours = left.as_secs() / 3600;
    if left < EXPIRY_WARNING {
        warn!(parent: span, hours, "{what}; it ends soon, and peers refuse this node from then \
            on: issue a new one (`peerbus ca issue`) in its place");
    } else {
        info!(parent: span, hours, "{what}");
    }
}

/// The CAs of the CA certificate file `ca`, with the revocation lists of the file `crl` when
/// there is one.
pub(crate) fn load_trust(ca: &Path, crl: Option<&Path>) -> Result<MeshCa, CaError> {
    let trust = MeshCa::load(ca)?;
    match crl {
        Some(crl) => trust.with_revocation_list_file(crl),
        None => Ok(trust),
    }
}

/// The files of a node's mesh CA membership, read again every `every`.
pub(crate) struct Files {
    /// The CA certificate file (`--mesh-ca`).
    pub(crate) ca: PathBuf,
    /// This node's certificate file (`--mesh-cert`).
    pub(crate) cert: PathBuf,
    /// The CAs' revocation lists (`--mesh-crl`).
    pub(crate) crl: Option<PathBuf>,
    pub(crate) every: Duration,
}

/// What the files held at the last look, and what was refused (warned about once per
/// distinct content).
struct Seen {
    ca: MeshCa,
    cert: NodeCert,
    refused: Vec<String>,
    /// The revocation lists in use (CA and number) warned about as past their next update.
    stale: Vec<(String, Option<String>)>,
}

impl Seen {
    /// Warns about `error` unless it was warned about since the last change taken; the
    /// file's outcome, refused for that reason.
    fn refuse(&mut self, span: &Span, error: String) -> FileOutcome {
        if !self.refused.contains(&error) {
            warn!(parent: span, %error, "keeping the mesh membership in use");
            // One per file and content at most; bounded all the same.
            if self.refused.len() == 8 {
                self.refused.remove(0);
            }
            self.refused.push(error.clone());
        }
        FileOutcome::Refused(error)
    }

    /// Warns once about each revocation list in use (its own or one a peer passed on) that
    /// is past its next update: it is still used, but its CA may have revoked more since.
    fn warn_stale(&mut self, shared: &Shared, span: &Span) {
        let now = crate::message::now_unix_ms() / 1000;
        for list in shared.endpoint.revocation_list_info() {
            let key = (list.ca.clone(), list.number.clone());
            if !list.stale_at(now) || self.stale.contains(&key) {
                continue;
            }
            warn!(parent: span, ca = %list.ca, number = list.number.as_deref().unwrap_or("none"),
                next_update = list.next_update.unwrap_or(0), "a mesh CA revocation list in use is \
                past its next update: it is still used, but the CA may have revoked more since; \
                give the mesh a newer one (`peerbus ca revoke --renew`)");
            // One per CA in use at most (a newer list of a CA replaces its older one).
            if self.stale.len() == peerbus_transport::MAX_CA_CERTS {
                self.stale.remove(0);
            }
            self.stale.push(key);
        }
    }
}

/// Reads the CA and certificate files every `files.every` until `cancel`, and at once when
/// asked through `reloads`. A CA file that changed replaces the trusted CAs
/// ([`peerbus_transport::Endpoint::renew_trust`]: live connections are checked again), and a
/// certificate file that changed replaces this node's certificate
/// ([`peerbus_transport::Endpoint::renew_certificate`]), each when the endpoint accepts it;
/// otherwise the one in use stays and the reason is logged.
pub(crate) async fn watch(
    shared: Arc<Shared>,
    files: Files,
    (ca, cert): (MeshCa, NodeCert),
    mut reloads: mpsc::Receiver<ReloadRequest>,
    cancel: CancellationToken,
    span: Span,
) {
    let mut seen = Seen {
        ca,
        cert,
        refused: Vec::new(),
        stale: Vec::new(),
    };
    seen.warn_stale(&shared, &span);
    loop {
        let first = tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(files.every) => None,
            Some(reply) = reloads.recv() => Some(reply),
        };
        // Every request queued by now is answered by this look, which reads the files after
        // they were asked; one that comes during the look waits for the next.
        let asked: Vec<ReloadRequest> = first
            .into_iter()
            .chain(std::iter::from_fn(|| reloads.try_recv().ok()))
            .take(RELOAD_QUEUE + 1)
            .collect();
        let Some(outcome) = look(&shared, &files, &mut seen, &span).await else {
            return;
        };
        seen.warn_stale(&shared, &span);
        for reply in asked {
            let _ = reply.send(outcome.clone());
        }
    }
}

/// Reads the files once and takes what changed (see [`watch`]); `None` when the runtime is
/// shutting down.
async fn look(shared: &Shared, files: &Files, seen: &mut Seen, span: &Span) -> Option<MeshReload> {
    let (ca_path, cert_path, crl_path) = (files.ca.clone(), files.cert.clone(), files.crl.clone());
    let read = tokio::task::spawn_blocking(move || {
        (
            load_trust(&ca_path, crl_path.as_deref()),
            NodeCert::load(&cert_path),
        )
    });
    // Only a panic in the read (never expected) or a runtime shutting down.
    let (ca, cert) = read.await.ok()?;
    let (mut ca_outcome, mut cert_outcome) = (FileOutcome::Unchanged, FileOutcome::Unchanged);
    let new_ca = match ca {
        Ok(ca) if ca != seen.ca => Some(ca),
        Ok(_) => None,
        Err(e) => {
            ca_outcome = seen.refuse(
                span,
                format!("cannot read the mesh CA file or its revocation lists: {e}"),
            );
            None
        }
    };
    let new_cert = match cert {
        Ok(cert) if cert.der() != seen.cert.der() => Some(cert),
        Ok(_) => None,
        Err(e) => {
            cert_outcome = seen.refuse(span, format!("cannot read the mesh certificate: {e}"));
            None
        }
    };
    // The CA first; if it does not accept the certificate in use, a new certificate the CA
    // in use accepts may come first (both files replaced at once, during a CA change).
    let ca_changed = new_ca.is_some();
    let mut refused_ca = new_ca.and_then(|ca| take_trust(shared, span, seen, ca).err());
    if let Some(cert) = new_cert {
        match shared.renew_certificate(&cert) {
            Ok(()) => {
                report(
                    span,
                    &cert,
                    "renewed this node's mesh certificate from its file",
                );
                seen.cert = cert;
                seen.refused.clear();
                cert_outcome = FileOutcome::Taken;
            }
            Err(e) => {
                cert_outcome = seen.refuse(span, format!("refusing the new mesh certificate: {e}"));
            }
        }
        refused_ca = refused_ca.and_then(|(ca, _)| take_trust(shared, span, seen, ca).err());
    }
    if let Some((_, error)) = refused_ca {
        ca_outcome = seen.refuse(span, format!("refusing the new mesh CA file: {error}"));
    } else if ca_changed {
        ca_outcome = FileOutcome::Taken;
    }
    Some(MeshReload {
        ca: Some(ca_outcome),
        certificate: Some(cert_outcome),
        key_file: None,
    })
}

/// Trusts `ca` if the endpoint takes it; gives it back with the reason if not. Revocation
/// lists it brings are passed on to the peers (`super::revocations`).
fn take_trust(
    shared: &Shared,
    span: &Span,
    seen: &mut Seen,
    ca: MeshCa,
) -> Result<(), (MeshCa, String)> {
    let before = shared.endpoint.revocation_lists();
    match shared.endpoint.renew_trust(ca.clone()) {
        Ok(()) => {
            let new: Vec<Vec<u8>> = shared
                .endpoint
                .revocation_lists()
                .into_iter()
                .filter(|l| !before.contains(l))
                .collect();
            // Full only while peers' lists queue up: those are passed on in their turn, and
            // every new connection is sent the lists held then.
            if !new.is_empty() && shared.revocations.try_send(News::Taken(new)).is_err() {
                warn!(parent: span, "could not pass the new revocation list on to peers now; each new connection gets it");
            }
            info!(parent: span, revoked = ca.revoked(), "trusting the mesh CA file and its \
                revocation lists as they are now; live connections are checked again");
            seen.ca = ca;
            seen.refused.clear();
            shared.membership_changed();
            Ok(())
        }
        Err(e) => Err((ca, e.to_string())),
    }
}
