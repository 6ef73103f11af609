//! How records and keys are laid out on disk.
//!
//! A value is `crc32(body)` (4 bytes, little-endian) followed by `body`, the
//! bincode encoding (standard config) of the record. Decoding checks the
//! checksum, then decodes, then insists every byte was used: anything else is
//! a corrupt record, never data.

use peerbus_transport::NodeId;
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::StoreError;

/// Encodes `v` as checksum + bincode.
pub(super) fn seal<T: Serialize + ?Sized>(v: &T) -> Result<Vec<u8>, StoreError> {
    let mut out = vec![0u8; 4];
    bincode::serde::encode_into_std_write(v, &mut out, bincode::config::standard())
        .map_err(|e| StoreError::Db(format!("cannot encode a store record: {e}")))?;
    let crc = crc32fast::hash(&out[4..]);
    out[..4].copy_from_slice(&crc.to_le_bytes());
    Ok(out)
}

/// Decodes a sealed value; the error says why it is not a valid record.
pub(super) fn open_sealed<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    let Some((crc, body)) = bytes.split_first_chunk::<4>() else {
        return Err(format!(
            "record of {} bytes is shorter than its checksum",
            bytes.len()
        ));
    };
    if crc32fast::hash(body) != u32::from_le_bytes(*crc) {
        return Err("checksum mismatch".into());
    }
    let (v, used) = bincode::serde::decode_from_slice(body, bincode::config::standard())
        .map_err(|e| format!("checksum ok but does not decode: {e}"))?;
    if used != body.len() {
        return Err(format!(
            "checksum ok but {} trailing bytes after the record",
            body.len() - used
        ));
    }
    Ok(v)
}

/// Key of an entry: the log name's bytes, `0x00`, the seq big-endian. Byte order of keys is
/// `(log, seq)` order for log names without NUL characters (all real ones); the key is
/// unambiguous for every name because the seq is always the last 8 bytes.
pub(super) fn entry_key(log: &str, seq: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(log.len() + 9);
    k.extend_from_slice(log.as_bytes());
    k.push(0);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// `(log, seq)` of an entry key, if it is well formed.
pub(super) fn parse_entry_key(k: &[u8]) -> Option<(String, u64)> {
    let (head, seq) = k.split_last_chunk::<8>()?;
    let (sep, name) = head.split_last()?;
    if *sep != 0 {
        return None;
    }
    Some((
        std::str::from_utf8(name).ok()?.to_string(),
        u64::from_be_bytes(*seq),
    ))
}

/// Key of a dedup window: the origin's 32 id bytes, then the log name.
pub(super) fn window_key(origin: &NodeId, log: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(32 + log.len());
    k.extend_from_slice(origin.as_bytes());
    k.extend_from_slice(log.as_bytes());
    k
}

/// A readable name for a raw key of `table`, for reports and the quarantine.
pub(super) fn describe_key(table: &str, k: &[u8]) -> String {
    match table {
        "entries" => parse_entry_key(k).map(|(log, seq)| format!("{log}#{seq}")),
        "windows" => k.split_first_chunk::<32>().and_then(|(origin, log)| {
            let log = std::str::from_utf8(log).ok()?;
            Some(format!("{}/{log}", NodeId::from_bytes(*origin)))
        }),
        _ => std::str::from_utf8(k).ok().map(str::to_string),
    }
    .unwrap_or_else(|| hex(k))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{DeadLetter, StoredEntry};
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn entry_keys_round_trip_and_sort_like_log_then_seq(
            a in "[a-z:]{0,6}", b in "[a-z:]{0,6}", x in any::<u64>(), y in any::<u64>()
        ) {
            prop_assert_eq!(parse_entry_key(&entry_key(&a, x)), Some((a.clone(), x)));
            prop_assert_eq!(
                entry_key(&a, x).cmp(&entry_key(&b, y)),
                (&a, x).cmp(&(&b, y))
            );
        }

        #[test]
        fn decoding_garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = open_sealed::<StoredEntry>(&bytes);
            let _ = open_sealed::<DeadLetter>(&bytes);
            let _ = open_sealed::<u64>(&bytes);
            let _ = parse_entry_key(&bytes);
            let _ = describe_key("entries", &bytes);
            let _ = describe_key("windows", &bytes);
        }

        #[test]
        fn any_flipped_byte_is_detected(v in any::<u64>(), at in any::<prop::sample::Index>(), bit in 0u8..8) {
            let mut sealed = seal(&(v, "x".to_string())).expect("seal");
            let i = at.index(sealed.len());
            sealed[i] ^= 1 << bit;
            prop_assert!(open_sealed::<(u64, String)>(&sealed).is_err());
        }
    }
}
