//! The mesh CA's revocation lists, passed from node to node (protocol 8,
//! [`Control::Revocations`](crate::engine::wire::Control::Revocations)).
//!
//! An operator gives a new list (`peerbus ca revoke`) to one node, by its `--mesh-crl` file;
//! that node sends it to its peers, and each peer that takes it (signed by its mesh CA, newer
//! than the list it holds for that CA) checks its live connections again and passes it on. A
//! list held already, or an older one, goes no further, so each list crosses each link about
//! once. Nodes send the lists they hold on every new connection too, so a node that was away
//! learns of the revocations it missed from its first peer.
//!
//! With a data directory, the lists a node holds are kept in [`KEPT_LISTS`] and taken again
//! at start, before any connection: a restarted node does not admit a revoked peer while it
//! waits to hear from the others.
//!
//! Bounds: [`QUEUE`] frames of lists waiting to be checked (more are dropped: the peers that
//! pass a list on are many, and each new connection sends it again), each frame read for at
//! most [`MAX_CA_CERTS`] lists, each list at most the node's largest message.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use peerbus_transport::{
    ListTaken, MAX_CA_CERTS, Membership, NodeId, read_revocation_lists, revocation_lists_pem,
    write_replacing,
};
use tokio::sync::mpsc;
use tracing::{Span, debug, info, warn};

use super::Shared;
use super::core::CoreMsg;

/// Frames of revocation lists from peers waiting to be checked.
pub(crate) const QUEUE: usize = 16;

/// The file in the data directory that keeps the revocation lists a node holds.
pub(crate) const KEPT_LISTS: &str = "mesh-revocations.crl";

/// What the revocation task hears of.
pub(crate) enum News {
    /// A peer sent these lists.
    FromPeer(NodeId, Vec<Bytes>),
    /// This node took these lists from its own files: keep them and pass them on.
    Taken(Vec<Vec<u8>>),
}

/// Checks the lists peers send, takes the newer ones, keeps them in the data directory and
/// passes them on, until the node stops.
pub(crate) async fn run(
    shared: Arc<Shared>,
    mut news: mpsc::Receiver<News>,
    data_dir: Option<PathBuf>,
    span: Span,
) {
    // Own-certificate refusals are warned about once per list, not once per peer.
    let mut refused: Vec<Bytes> = Vec::new();
    loop {
        let item = tokio::select! {
            () = shared.cancel.cancelled() => return,
            item = news.recv() => match item {
                Some(item) => item,
                None => return,
            },
        };
        let taken = match item {
            News::Taken(lists) => lists,
            News::FromPeer(peer, lists) => {
                let revoked_before = shared.endpoint.revoked_certificates();
                let endpoint = shared.endpoint.clone();
                let checked = tokio::task::spawn_blocking(move || {
                    lists
                        .into_iter()
                        .take(MAX_CA_CERTS)
                        .map(|der| {
                            let r = endpoint.take_revocation_list(&der);
                            (der, r)
                        })
                        .collect::<Vec<_>>()
                })
                .await;
                // Only a panic in the check (never expected) or a runtime shutting down.
                let Ok(checked) = checked else { return };
                let mut taken = Vec::new();
                for (der, result) in checked {
                    match result {
                        Ok(ListTaken::Taken) => taken.push(der.to_vec()),
                        Ok(ListTaken::NotNewer) => {}
                        Ok(ListTaken::RevokesThisNode(why)) => {
                            if !refused.contains(&der) {
                                warn!(parent: &span, peer = %peer.short(), %why, "a peer passed on a mesh CA revocation list that revokes this node: its peers refuse it from now on");
                                refused.truncate(MAX_CA_CERTS - 1);
                                refused.insert(0, der);
                            }
                        }
                        // Another CA's list (a peer that trusts a CA this node does not, while
                        // a CA is replaced), or one that does not parse.
                        Err(e) => {
                            debug!(parent: &span, peer = %peer.short(), error = %e, "not taking a revocation list a peer passed on");
                        }
                    }
                }
                let revoked = shared.endpoint.revoked_certificates();
                if !taken.is_empty() && revoked != revoked_before {
                    info!(parent: &span, peer = %peer.short(), lists = taken.len(), revoked = revoked.unwrap_or(0), "took a newer mesh CA revocation list from a peer; live connections are checked again, and the list is passed on");
                } else if !taken.is_empty() {
                    // The first list a node without a list file hears of, most often: the
                    // CA's empty one. Not news for the operator.
                    debug!(parent: &span, peer = %peer.short(), lists = taken.len(), revoked = revoked.unwrap_or(0), "took a newer mesh CA revocation list from a peer that revokes as many certificates as the one it replaces; passing it on");
                }
                taken
            }
        };
        if taken.is_empty() {
            continue;
        }
        if let Some(dir) = &data_dir {
            keep(dir, shared.endpoint.revocation_lists(), &span).await;
        }
        let frame: Vec<Bytes> = taken.into_iter().map(Bytes::from).collect();
        if shared.core.send(CoreMsg::Revocations(frame)).await.is_err() {
            return;
        }
    }
}

/// Writes `lists` to [`KEPT_LISTS`] in `dir` (a new file renamed over the old one).
async fn keep(dir: &Path, lists: Vec<Vec<u8>>, span: &Span) {
    let path = dir.join(KEPT_LISTS);
    let written = tokio::task::spawn_blocking(move || {
        write_replacing(&path, revocation_lists_pem(&lists).as_bytes())
    })
    .await;
    match written {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            warn!(parent: span, error = %e, "cannot keep the mesh CA revocation lists in the data directory; a restart takes them from peers again")
        }
        Err(_) => {}
    }
}

/// `membership` with the revocation lists kept in `dir` ([`KEPT_LISTS`]) taken where they
/// are newer than its own. A list its CA no longer signs, or a file that cannot be read, is
/// warned about and left out: the node starts with the lists of its files.
pub(crate) fn with_kept_lists(membership: Membership, dir: Option<&Path>) -> Membership {
    let (Membership::Ca { ca, cert }, Some(dir)) = (&membership, dir) else {
        return membership;
    };
    let path = dir.join(KEPT_LISTS);
    if !path.exists() {
        return membership;
    }
    let lists = match read_revocation_lists(&path) {
        Ok(lists) => lists,
        Err(e) => {
            warn!(error = %e, "cannot read the revocation lists this node kept; starting with those of its files");
            return membership;
        }
    };
    let mut ca = ca.clone();
    for der in lists {
        match ca.with_newer_revocation_list(&der) {
            Ok(Some(newer)) => ca = newer,
            Ok(None) => {}
            Err(e) => {
                warn!(error = %e, path = %path.display(), "leaving out a kept revocation list")
            }
        }
    }
    Membership::Ca {
        ca,
        cert: cert.clone(),
    }
}
