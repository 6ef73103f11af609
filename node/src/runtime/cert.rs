//! A node's mesh certificate while it runs (membership by a mesh CA): how long it is valid,
//! and a renewed one taken from its file without a restart.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use peerbus_transport::NodeCert;
use tokio_util::sync::CancellationToken;
use tracing::{Span, info, warn};

use super::Shared;

/// How often a node reads its certificate file again by default
/// ([`NodeBuilder::mesh_cert_check_every`](crate::NodeBuilder::mesh_cert_check_every)).
pub(crate) const CHECK_EVERY: Duration = Duration::from_secs(60);

/// A certificate that ends sooner than this is warned about, at start and when renewed.
const EXPIRY_WARNING: Duration = Duration::from_secs(7 * 86_400);

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

/// Reads the certificate at `path` every `every` until `cancel`; one that differs from the
/// one in use and is valid replaces it ([`peerbus_transport::Endpoint::renew_certificate`]).
/// A file that cannot be read or used is warned about once per distinct content, and the
/// certificate in use stays.
pub(crate) async fn watch(
    shared: Arc<Shared>,
    path: PathBuf,
    mut current: NodeCert,
    every: Duration,
    cancel: CancellationToken,
    span: Span,
) {
    let mut refused: Option<Result<Vec<u8>, String>> = None;
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
        let file = path.clone();
        let loaded = match tokio::task::spawn_blocking(move || NodeCert::load(&file)).await {
            Ok(loaded) => loaded,
            // Only a panic in the read (never expected) or a runtime shutting down.
            Err(_) => return,
        };
        let cert = match loaded {
            Ok(cert) if cert.der() == current.der() => continue,
            Ok(cert) => cert,
            Err(e) => {
                let seen = Err(e.to_string());
                if refused.as_ref() != Some(&seen) {
                    warn!(parent: &span, error = %e, "cannot read the renewed mesh certificate; \
                        keeping the one in use");
                    refused = Some(seen);
                }
                continue;
            }
        };
        match shared.endpoint.renew_certificate(&cert) {
            Ok(()) => {
                report(
                    &span,
                    &cert,
                    "renewed this node's mesh certificate from its file",
                );
                current = cert;
                refused = None;
            }
            Err(e) => {
                let seen = Ok(cert.der().to_vec());
                if refused.as_ref() != Some(&seen) {
                    warn!(parent: &span, error = %e, "refusing the mesh certificate in {}; \
                        keeping the one in use", path.display());
                    refused = Some(seen);
                }
            }
        }
    }
}
