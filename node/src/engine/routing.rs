//! Pure routing decisions: topic pattern matching, key → lane, and
//! rendezvous hashing of keys over live instances.

use peerbus_transport::NodeId;

/// Whether `topic` matches `pattern`.
///
/// Tokens are separated by `.`; `*` matches exactly one token and `>` (only
/// as the last token) matches one or more remaining tokens.
pub fn topic_matches(pattern: &str, topic: &str) -> bool {
    let mut pat = pattern.split('.');
    let mut top = topic.split('.');
    loop {
        match (pat.next(), top.next()) {
            (Some(">"), Some(_)) => return pat.next().is_none(),
            (Some("*"), Some(_)) => {}
            (Some(p), Some(t)) if p == t => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Longest topic, pattern, service or group name, in bytes: names travel in frames and are
/// kept per known group, so names a node learns from its peers are held to it too.
pub const MAX_SUBJECT_LEN: usize = 256;

/// Checks a topic or pattern for publishing/subscribing: non-empty tokens,
/// wildcards only in patterns and `>` only last, at most [`MAX_SUBJECT_LEN`] bytes.
pub fn validate_subject(subject: &str, allow_wildcards: bool) -> Result<(), String> {
    if subject.is_empty() {
        return Err("must not be empty".into());
    }
    if subject.len() > MAX_SUBJECT_LEN {
        return Err(format!(
            "is {} bytes long; at most {MAX_SUBJECT_LEN} are allowed",
            subject.len()
        ));
    }
    let mut tokens = subject.split('.').peekable();
    while let Some(t) = tokens.next() {
        if t.is_empty() {
            return Err(format!(
                "`{subject}` has an empty token (two dots, or a dot at an end)"
            ));
        }
        let wild = t == "*" || t == ">";
        if wild && !allow_wildcards {
            return Err(format!(
                "`{subject}`: wildcards are only allowed when subscribing"
            ));
        }
        if t == ">" && tokens.peek().is_some() {
            return Err(format!("`{subject}`: `>` may only be the last token"));
        }
        if !wild && (t.contains('*') || t.contains('>')) {
            return Err(format!(
                "`{subject}`: `*` and `>` must stand alone as a token"
            ));
        }
    }
    Ok(())
}

/// 64-bit FNV-1a: stable across processes and versions (unlike `DefaultHasher`).
pub fn stable_hash(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for b in *part {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        // Separator so ("ab","c") and ("a","bc") differ.
        h ^= 0xff;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Rendezvous (highest random weight) choice of the instance that owns `key`.
///
/// Every node computes the same owner from the same set, and when an instance
/// leaves only the keys it owned move.
pub fn rendezvous<'a>(
    key: &str,
    candidates: impl IntoIterator<Item = &'a NodeId>,
) -> Option<NodeId> {
    candidates
        .into_iter()
        .map(|n| (stable_hash(&[key.as_bytes(), n.as_bytes()]), *n))
        .max()
        .map(|(_, n)| n)
}

/// The data lane a message travels on: the same key always uses the same lane.
pub fn lane_for(log: &str, key: Option<&str>, lanes: usize, round_robin: u64) -> usize {
    let lanes = lanes.max(1) as u64;
    let idx = match key {
        Some(k) => stable_hash(&[log.as_bytes(), k.as_bytes()]) % lanes,
        None => round_robin % lanes,
    };
    idx as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(pattern: &str, topic: &str, expected: bool) {
        assert_eq!(
            topic_matches(pattern, topic),
            expected,
            "pattern {pattern} topic {topic}"
        );
    }

    #[test]
    fn wildcard_table() {
        for (p, t, e) in [
            ("a.b.c", "a.b.c", true),
            ("a.b.c", "a.b", false),
            ("a.b", "a.b.c", false),
            ("a.*.c", "a.b.c", true),
            ("a.*.c", "a.b.d", false),
            ("a.*", "a.b.c", false),
            ("a.>", "a.b.c", true),
            ("a.>", "a.b", true),
            ("a.>", "a", false),
            (">", "a", true),
            (">", "a.b.c", true),
            ("*", "a", true),
            ("*", "a.b", false),
            ("*.b.>", "x.b.y.z", true),
            ("*.b.>", "x.c.y", false),
            ("payment.succeeded", "payment.failed", false),
        ] {
            check(p, t, e);
        }
    }

    #[test]
    fn subject_validation() {
        assert!(validate_subject("a.b", false).is_ok());
        assert!(validate_subject("a.*.>", true).is_ok());
        assert!(validate_subject("a.*", false).is_err());
        assert!(validate_subject("a..b", true).is_err());
        assert!(validate_subject("a.>.b", true).is_err());
        assert!(validate_subject("a.b*", true).is_err());
        assert!(validate_subject("", true).is_err());
        assert!(validate_subject(&"a".repeat(MAX_SUBJECT_LEN), false).is_ok());
        assert!(validate_subject(&"a".repeat(MAX_SUBJECT_LEN + 1), true).is_err());
    }

    #[test]
    fn rendezvous_moves_only_the_leavers_keys() {
        let nodes: Vec<NodeId> = (1..=4u8).map(|b| NodeId::from_bytes([b; 32])).collect();
        let keys: Vec<String> = (0..1000).map(|i| format!("k{i}")).collect();
        let before: Vec<NodeId> = keys
            .iter()
            .filter_map(|k| rendezvous(k, nodes.iter()))
            .collect();
        let survivors = &nodes[..3];
        let mut moved = 0;
        for (k, owner) in keys.iter().zip(&before) {
            let now = rendezvous(k, survivors.iter()).expect("owner");
            if owner != &nodes[3] {
                assert_eq!(&now, owner, "key {k} moved although its owner stayed");
            } else {
                moved += 1;
            }
        }
        // Roughly a quarter of the keys belonged to the leaver.
        assert!((150..350).contains(&moved), "moved {moved}");
    }

    #[test]
    fn lanes_are_stable_per_key() {
        let a = lane_for("svc:x", Some("order-1"), 4, 0);
        for rr in 0..10 {
            assert_eq!(lane_for("svc:x", Some("order-1"), 4, rr), a);
        }
        let spread: std::collections::HashSet<usize> =
            (0..8).map(|rr| lane_for("svc:x", None, 4, rr)).collect();
        assert_eq!(spread.len(), 4);
    }
}
