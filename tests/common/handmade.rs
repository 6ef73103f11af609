//! A mesh member made by hand from the transport and the wire types, as another build (an
//! older one, a newer one, a buggy or hostile one) would be. It binds 127.0.0.1.

use std::sync::Arc;

use peerbus::engine::wire::{Control, ControlV4, Data, Dialect, Envelope, Hello, Kind};
use peerbus::{Bytes, MeshKey, Node, NodeId};
use peerbus_transport::{
    Connection, Endpoint, EndpointConfig, FrameReceiver, FrameSender, Identity, Membership,
};

/// A hand-made peer connected to a node, its control stream open.
pub struct HandMade {
    /// Kept open while the peer is used.
    pub endpoint: Endpoint,
    /// The connection to the node.
    pub conn: Connection,
    /// The control stream: kept open (closing it ends the connection).
    pub ctl_tx: FrameSender,
    /// The control stream, read for the node's hello and acks.
    pub ctl_rx: FrameReceiver,
}

impl HandMade {
    /// Dials `node` offering only the ALPN id `alpn` and opens the control stream.
    pub async fn dial(key: &MeshKey, node: &Node, alpn: &[u8]) -> HandMade {
        let identity = Identity::generate().expect("identity");
        HandMade::dial_as(identity, Membership::Key(key.clone()), node, alpn).await
    }

    /// [`HandMade::dial`] as `identity`, a member by `membership` (a mesh CA's certificate,
    /// say).
    pub async fn dial_as(
        identity: Identity,
        membership: Membership,
        node: &Node,
        alpn: &[u8],
    ) -> HandMade {
        let mut config =
            EndpointConfig::new(identity, membership, "127.0.0.1:0".parse().expect("addr"));
        config.alpn = vec![alpn.to_vec()];
        let endpoint = Endpoint::bind(config).expect("bind");
        let conn = endpoint
            .connect(node.local_addr(), Some(node.id()))
            .await
            .expect("connect");
        let (ctl_tx, ctl_rx) = conn.open_bi().await.expect("control stream");
        HandMade {
            endpoint,
            conn,
            ctl_tx,
            ctl_rx,
        }
    }

    /// This peer's hello (service `hand-made`, mesh `test`) naming versions `min..=max`.
    pub fn hello(&self, min: u32, max: u32) -> Hello {
        Hello {
            version: max,
            node_id: self.endpoint.node_id(),
            service: "hand-made".into(),
            mesh: "test".into(),
            interests: Vec::new(),
            serves: false,
            credits: 16,
            incarnation: 1,
            consumes: false,
            min_version: min,
        }
    }

    /// Sends a protocol 4 hello, as a build of protocol 4 does, and reads the node's.
    pub async fn hello_v4(&mut self) -> Option<ControlV4> {
        let ours = ControlV4::Hello(self.hello(4, 4).to_v4());
        self.ctl_tx.send(&ours).await.expect("hello");
        self.ctl_rx.recv::<ControlV4>().await.ok().flatten()
    }

    /// Sends a negotiated hello naming `min..=max` and reads the node's; `None` when the node
    /// answered none (it closed the connection).
    pub async fn hello_negotiated(&mut self, min: u32, max: u32) -> Option<Hello> {
        let ours = self.hello(min, max);
        self.send_hello(ours).await
    }

    /// Sends `ours` as a negotiated hello and reads the node's, as [`HandMade::hello_negotiated`].
    pub async fn send_hello(&mut self, ours: Hello) -> Option<Hello> {
        let ours = Control::Hello(Box::new(ours));
        self.ctl_tx.send(&ours).await.expect("hello");
        match self.ctl_rx.recv::<Control>().await {
            Ok(Some(Control::Hello(h))) => Some(*h),
            _ => None,
        }
    }

    /// Delivers one `orders` message with `origin` in its envelope on a new lane, written in
    /// `dialect` (with [`Dialect::PeerOrigin`] the origin stays off the wire).
    pub async fn deliver(&self, dialect: Dialect, origin: NodeId, seq: u64, text: &str) {
        let mut lane = self.conn.open_uni().await.expect("lane");
        push_delivery(&mut lane, dialect, origin, seq, text);
        lane.flush().await.expect("deliver");
    }

    /// Waits (up to 10 s) until the node closes the connection, with a reason that contains
    /// `reason`.
    pub async fn closed_with(&self, reason: &str) {
        let closed = tokio::time::timeout(std::time::Duration::from_secs(10), self.conn.closed())
            .await
            .unwrap_or_else(|_| panic!("the node did not close the connection ({reason})"));
        assert!(
            closed.to_string().contains(reason),
            "closed for another reason than `{reason}`: {closed}"
        );
    }

    /// Reads control frames until an `Ack` (protocol 4) or `AckRuns` (5); returns its log and
    /// seqs.
    pub async fn next_ack(&mut self) -> (String, Vec<u64>) {
        loop {
            match self.ctl_rx.recv::<Control>().await.expect("control frame") {
                Some(Control::Ack { log, seqs }) => return (log, seqs),
                Some(Control::AckRuns { log, runs }) => {
                    return (log, Control::expand_runs(&runs).expect("a few runs"));
                }
                Some(_) => {}
                None => panic!("control stream ended before the ack"),
            }
        }
    }
}

/// Buffers on `s` a request for `service` (correlation id `corr`, a 10 s budget) from the peer
/// `origin`, with `text` as its payload, in the dialect of protocol 5 and later.
pub fn push_request(s: &mut FrameSender, origin: NodeId, service: &str, corr: u64, text: &str) {
    let env = envelope(origin, "", corr, Kind::Request, service, text);
    let frame = Data::Request {
        budget_ms: 10_000,
        env: Arc::new(env),
    };
    push_frame(s, &frame, Dialect::PeerOrigin);
}

/// Buffers on `s` one `orders` message with `origin` in its envelope, written in `dialect`
/// (with [`Dialect::PeerOrigin`] the origin stays off the wire).
pub fn push_delivery(s: &mut FrameSender, dialect: Dialect, origin: NodeId, seq: u64, text: &str) {
    let env = envelope(origin, "svc:orders", seq, Kind::Send, "orders", text);
    let frame = Data::Deliver {
        floor: seq,
        key_floor: None,
        env: Arc::new(env),
    };
    push_frame(s, &frame, dialect);
}

/// An envelope with no key, headers or content type, `text` as its payload.
fn envelope(
    origin: NodeId,
    log: &str,
    seq: u64,
    kind: Kind,
    destination: &str,
    text: &str,
) -> Envelope {
    Envelope {
        origin,
        log: log.into(),
        seq,
        kind,
        destination: destination.into(),
        key: None,
        headers: Default::default(),
        content_type: None,
        created_at_ms: 0,
        attempt: 1,
        payload: Bytes::from(text.to_string()),
    }
}

/// Buffers `frame` on `s`, written in `dialect`.
fn push_frame(s: &mut FrameSender, frame: &Data, dialect: Dialect) {
    s.push_encoded_with_payload(
        |buf| {
            frame.encode_head_in(buf, dialect);
        },
        frame.payload(),
    )
    .expect("frame");
}
