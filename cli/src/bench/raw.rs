//! Raw transport baselines: quinn plus the length-prefixed frame codec of `peerbus-transport`,
//! with no node, no log and no acknowledgements.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use peerbus::{Bytes, MeshKey};
use peerbus_transport::{Endpoint, EndpointConfig, Identity, Membership};

/// Writes are coalesced up to this many buffered bytes before a flush, like the node's writer.
const COALESCE_BYTES: usize = 64 * 1024;

fn endpoint(key: &MeshKey) -> Result<Endpoint> {
    let id = Identity::generate().context("generating an identity")?;
    let listen = "127.0.0.1:0".parse().context("loopback address")?;
    Endpoint::bind(EndpointConfig::new(
        id,
        Membership::Key(key.clone()),
        listen,
    ))
    .context("binding a loopback endpoint")
}

/// Frames per second of `frames` frames of `size` bytes on one unidirectional stream of one
/// connection, coalesced into writes of [`COALESCE_BYTES`].
pub(crate) async fn stream(size: usize, frames: usize) -> Result<f64> {
    let key = MeshKey::generate();
    let (a, b) = (endpoint(&key)?, endpoint(&key)?);
    let server_ep = b.clone();
    let server = tokio::spawn(async move {
        let incoming = server_ep.accept().await.context("no incoming connection")?;
        let conn = incoming.complete().await.context("accepting")?;
        let mut rx = conn.accept_uni().await.context("accepting a stream")?;
        let mut n = 0usize;
        while let Some(_frame) = rx.recv::<Bytes>().await.context("receiving")? {
            n += 1;
        }
        anyhow::Ok(n)
    });
    let conn = a
        .connect(b.local_addr(), Some(b.node_id()))
        .await
        .context("connecting")?;
    let mut tx = conn.open_uni().await.context("opening a stream")?;
    let payload = Bytes::from(vec![0x42u8; size]);
    let t0 = Instant::now();
    for _ in 0..frames {
        tx.push(&payload).context("encoding")?;
        if tx.buffered_bytes() >= COALESCE_BYTES {
            tx.flush().await.context("writing")?;
        }
    }
    tx.finish().await.context("finishing")?;
    let got = server.await.context("receiver task")??;
    if got != frames {
        bail!("raw stream delivered {got} of {frames} frames");
    }
    Ok(frames as f64 / t0.elapsed().as_secs_f64())
}

/// Round-trip times of `rounds` small frames echoed on one bidirectional stream.
pub(crate) async fn pingpong(rounds: usize) -> Result<Vec<Duration>> {
    let key = MeshKey::generate();
    let (a, b) = (endpoint(&key)?, endpoint(&key)?);
    let server_ep = b.clone();
    tokio::spawn(async move {
        let incoming = server_ep.accept().await.context("no incoming connection")?;
        let conn = incoming.complete().await.context("accepting")?;
        let (mut tx, mut rx) = conn.accept_bi().await.context("accepting a stream")?;
        while let Some(v) = rx.recv::<u64>().await.context("receiving")? {
            tx.send(&v).await.context("echoing")?;
        }
        anyhow::Ok(())
    });
    let conn = a
        .connect(b.local_addr(), Some(b.node_id()))
        .await
        .context("connecting")?;
    let (mut tx, mut rx) = conn.open_bi().await.context("opening a stream")?;
    let mut lat = Vec::with_capacity(rounds);
    for i in 0..rounds as u64 {
        let t = Instant::now();
        tx.send(&i).await.context("sending")?;
        let back: Option<u64> = rx.recv().await.context("receiving")?;
        if back != Some(i) {
            bail!("ping-pong echoed {back:?} for {i}");
        }
        lat.push(t.elapsed());
    }
    Ok(lat)
}
