//! Raw transport baselines: quinn plus the length-prefixed frame codec of `peerbus-transport`,
//! with no node, no log and no acknowledgements.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use peerbus::{Bytes, MeshKey};
use peerbus_transport::{
    Connection, Endpoint, EndpointConfig, FrameReceiver, FrameSender, Identity, Membership,
};

use super::cases::Wire;

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

/// What one run of [`stream`] measured.
pub(crate) struct StreamFigures {
    /// Frames per second.
    pub(crate) msgs_per_s: f64,
    /// UDP payload bytes both ways (QUIC's count) per frame.
    pub(crate) wire_bytes_per_msg: f64,
    /// UDP datagrams both ways per frame.
    pub(crate) datagrams_per_msg: f64,
}

/// Frames per second of `frames` frames of `size` bytes on one unidirectional stream of one
/// connection, coalesced into writes of [`COALESCE_BYTES`].
pub(crate) async fn stream(size: usize, frames: usize) -> Result<StreamFigures> {
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
    let before = conn.traffic();
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
    let msgs_per_s = frames as f64 / t0.elapsed().as_secs_f64();
    let (wire_bytes_per_msg, datagrams_per_msg) =
        Wire::of(&conn.traffic()).per_message(Wire::of(&before), frames as f64);
    Ok(StreamFigures {
        msgs_per_s,
        wire_bytes_per_msg,
        datagrams_per_msg,
    })
}

/// Small frames echoed on one bidirectional stream between two endpoints in this process.
pub(crate) struct PingPong {
    tx: FrameSender,
    rx: FrameReceiver,
    next: u64,
    /// Keeps the connection and both endpoints open while rounds are run.
    link: (Connection, Endpoint, Endpoint),
}

impl PingPong {
    /// Connects the two endpoints and starts the echoing side.
    pub(crate) async fn start() -> Result<Self> {
        let key = MeshKey::generate();
        let (a, b) = (endpoint(&key)?, endpoint(&key)?);
        let server_ep = b.clone();
        tokio::spawn(async move {
            let incoming = server_ep.accept().await.context("no incoming connection")?;
            let conn = incoming.complete().await.context("accepting")?;
            // Each stream echoes in a task of its own (one for the latency rounds, one per
            // caller of `throughput`), as a server task per connection would.
            while let Ok((mut tx, mut rx)) = conn.accept_bi().await {
                tokio::spawn(async move {
                    while let Some(v) = rx.recv::<u64>().await.context("receiving")? {
                        tx.send(&v).await.context("echoing")?;
                    }
                    anyhow::Ok(())
                });
            }
            anyhow::Ok(())
        });
        let conn = a
            .connect(b.local_addr(), Some(b.node_id()))
            .await
            .context("connecting")?;
        let (tx, rx) = conn.open_bi().await.context("opening a stream")?;
        Ok(Self {
            tx,
            rx,
            next: 0,
            link: (conn, a, b),
        })
    }

    /// Round trips per second of `callers` tasks at once, each on a stream of its own doing
    /// its share of `total` round trips one after another: the raw counterpart of as many
    /// callers of `request`.
    pub(crate) async fn throughput(&self, callers: usize, total: usize) -> Result<f64> {
        let conn = &self.link.0;
        let mut streams = Vec::with_capacity(callers);
        for _ in 0..callers {
            streams.push(conn.open_bi().await.context("opening a stream")?);
        }
        let t0 = Instant::now();
        let mut tasks = Vec::with_capacity(callers);
        for (caller, (mut tx, mut rx)) in streams.into_iter().enumerate() {
            tasks.push(tokio::spawn(async move {
                for i in (caller..total).step_by(callers) {
                    let i = i as u64;
                    tx.send(&i).await.context("sending")?;
                    let back: Option<u64> = rx.recv().await.context("receiving")?;
                    if back != Some(i) {
                        bail!("ping-pong echoed {back:?} for {i}");
                    }
                }
                anyhow::Ok(())
            }));
        }
        for t in tasks {
            t.await.context("ping-pong caller")??;
        }
        Ok(total as f64 / t0.elapsed().as_secs_f64())
    }

    /// Round-trip times of `rounds` frames, one after another.
    pub(crate) async fn rounds(&mut self, rounds: usize) -> Result<Vec<Duration>> {
        let mut lat = Vec::with_capacity(rounds);
        for _ in 0..rounds {
            let i = self.next;
            self.next += 1;
            let t = Instant::now();
            self.tx.send(&i).await.context("sending")?;
            let back: Option<u64> = self.rx.recv().await.context("receiving")?;
            if back != Some(i) {
                bail!("ping-pong echoed {back:?} for {i}");
            }
            lat.push(t.elapsed());
        }
        Ok(lat)
    }
}
