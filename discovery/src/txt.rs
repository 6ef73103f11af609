//! The TXT record of an announcement, and checks on the local record.

use std::fmt;

use crate::{DiscoveryError, NodeId, PeerRecord, SERVICE_TYPE};

/// TXT key of the protocol version.
pub(crate) const KEY_VERSION: &str = "v";
/// TXT key of the node id.
pub(crate) const KEY_ID: &str = "id";
/// TXT key of the service name.
pub(crate) const KEY_SERVICE: &str = "svc";
/// TXT key of the mesh name.
pub(crate) const KEY_MESH: &str = "mesh";

/// Longest service or mesh name: a TXT string holds 255 bytes, `mesh=` included.
pub(crate) const MAX_NAME_LEN: usize = 200;

/// The fields a peer announces in its TXT record.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Txt {
    pub(crate) node_id: NodeId,
    pub(crate) service: String,
    pub(crate) mesh: String,
    pub(crate) protocol_version: u32,
}

/// Why a TXT record was rejected.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum TxtError {
    Missing(&'static str),
    Invalid { key: &'static str, value: String },
}

impl fmt::Display for TxtError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TxtError::Missing(key) => write!(f, "TXT key `{key}` is missing"),
            TxtError::Invalid { key, value } => {
                write!(f, "TXT key `{key}` has an invalid value {value:?}")
            }
        }
    }
}

/// The TXT properties announcing `local`.
pub(crate) fn properties(local: &PeerRecord) -> Vec<(&'static str, String)> {
    vec![
        (KEY_VERSION, local.protocol_version.to_string()),
        (KEY_ID, local.node_id.to_string()),
        (KEY_SERVICE, local.service.clone()),
        (KEY_MESH, local.mesh.clone()),
    ]
}

/// Parses a TXT record, `get` returning the value of a key.
pub(crate) fn parse<'a>(get: impl Fn(&str) -> Option<&'a str>) -> Result<Txt, TxtError> {
    let field = |key: &'static str| get(key).ok_or(TxtError::Missing(key));
    let invalid = |key: &'static str, value: &str| TxtError::Invalid {
        key,
        value: value.chars().take(64).collect(),
    };

    let version = field(KEY_VERSION)?;
    let protocol_version = version
        .parse::<u32>()
        .map_err(|_| invalid(KEY_VERSION, version))?;
    let id = field(KEY_ID)?;
    let node_id = id.parse::<NodeId>().map_err(|_| invalid(KEY_ID, id))?;
    let service = field(KEY_SERVICE)?;
    if !valid_name(service) {
        return Err(invalid(KEY_SERVICE, service));
    }
    let mesh = field(KEY_MESH)?;
    if !valid_name(mesh) {
        return Err(invalid(KEY_MESH, mesh));
    }
    Ok(Txt {
        node_id,
        service: service.to_owned(),
        mesh: mesh.to_owned(),
        protocol_version,
    })
}

/// The node id in an instance's full name (`<id>._peerbus._udp.local.`).
pub(crate) fn instance_id(fullname: &str) -> Option<NodeId> {
    let suffix_start = fullname.len().checked_sub(SERVICE_TYPE.len() + 1)?;
    let (instance, suffix) = fullname.split_at_checked(suffix_start)?;
    let suffix = suffix.strip_prefix('.')?;
    if !suffix.eq_ignore_ascii_case(SERVICE_TYPE) {
        return None;
    }
    instance.to_ascii_lowercase().parse().ok()
}

fn valid_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= MAX_NAME_LEN && !name.chars().any(char::is_control)
}

/// Checks that `local` can be announced.
pub(crate) fn check_local(local: &PeerRecord) -> Result<(), DiscoveryError> {
    for (what, name) in [("service", &local.service), ("mesh", &local.mesh)] {
        if !valid_name(name) {
            return Err(DiscoveryError::InvalidRecord(format!(
                "the {what} name {name:?} must be 1 to {MAX_NAME_LEN} bytes without control \
                 characters"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PROTOCOL_VERSION;

    fn id(b: u8) -> NodeId {
        NodeId::from_bytes([b; 32])
    }

    fn check(pairs: &[(&str, &str)], expected: Result<Txt, TxtError>) {
        let got = parse(|k| pairs.iter().find(|(key, _)| *key == k).map(|(_, v)| *v));
        assert_eq!(got, expected, "pairs {pairs:?}");
    }

    #[test]
    fn round_trips_the_local_record() {
        let local = PeerRecord {
            node_id: id(7),
            service: "orders".into(),
            mesh: "prod".into(),
            protocol_version: PROTOCOL_VERSION,
            addrs: vec![],
        };
        let props = properties(&local);
        let got = parse(|k| {
            props
                .iter()
                .find(|(key, _)| *key == k)
                .map(|(_, v)| v.as_str())
        });
        assert_eq!(
            got,
            Ok(Txt {
                node_id: id(7),
                service: "orders".into(),
                mesh: "prod".into(),
                protocol_version: PROTOCOL_VERSION,
            })
        );
    }

    #[test]
    fn rejects_garbage() {
        let good_id = id(1).to_string();
        let base = |over: (&'static str, &str)| -> Vec<(&'static str, String)> {
            [
                ("v", "1"),
                ("id", good_id.as_str()),
                ("svc", "orders"),
                ("mesh", "m"),
            ]
            .into_iter()
            .map(|(k, v)| {
                (
                    k,
                    if k == over.0 {
                        over.1.to_owned()
                    } else {
                        v.to_owned()
                    },
                )
            })
            .collect()
        };
        let invalid = |key, value: &str| {
            Err(TxtError::Invalid {
                key,
                value: value.to_owned(),
            })
        };
        for (over, expected) in [
            (("v", "x"), invalid("v", "x")),
            (("v", "-1"), invalid("v", "-1")),
            (("v", ""), invalid("v", "")),
            (("id", "not-an-id"), invalid("id", "not-an-id")),
            (("id", ""), invalid("id", "")),
            (("svc", ""), invalid("svc", "")),
            (("mesh", ""), invalid("mesh", "")),
            (("mesh", "a\nb"), invalid("mesh", "a\nb")),
        ] {
            let pairs = base(over);
            let pairs: Vec<(&str, &str)> = pairs.iter().map(|(k, v)| (*k, v.as_str())).collect();
            check(&pairs, expected);
        }
        let long = "m".repeat(MAX_NAME_LEN + 1);
        let pairs = base(("mesh", &long));
        let pairs: Vec<(&str, &str)> = pairs.iter().map(|(k, v)| (*k, v.as_str())).collect();
        check(&pairs, invalid("mesh", &"m".repeat(64)));

        check(&[], Err(TxtError::Missing("v")));
        check(&[("v", "1")], Err(TxtError::Missing("id")));
        check(
            &[("v", "1"), ("id", &good_id)],
            Err(TxtError::Missing("svc")),
        );
        check(
            &[("v", "1"), ("id", &good_id), ("svc", "s")],
            Err(TxtError::Missing("mesh")),
        );
    }

    #[test]
    fn instance_names() {
        let full = format!("{}.{SERVICE_TYPE}", id(3));
        assert_eq!(instance_id(&full), Some(id(3)));
        assert_eq!(instance_id(&full.to_ascii_uppercase()), Some(id(3)));
        assert_eq!(instance_id(SERVICE_TYPE), None);
        assert_eq!(instance_id(""), None);
        assert_eq!(instance_id("bob._peerbus._udp.local."), None);
        assert_eq!(instance_id(&format!("{}._other._udp.local.", id(3))), None);
    }

    #[test]
    fn local_record_checks() {
        let mut local = PeerRecord {
            node_id: id(1),
            service: "orders".into(),
            mesh: "m".into(),
            protocol_version: 1,
            addrs: vec![],
        };
        assert!(check_local(&local).is_ok());
        local.mesh = String::new();
        assert!(check_local(&local).is_err());
        local.mesh = "x".repeat(MAX_NAME_LEN + 1);
        assert!(check_local(&local).is_err());
    }
}
