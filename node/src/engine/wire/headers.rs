//! An envelope's headers, with its `traceparent` kept as 25 bytes.
//!
//! Every message carries a `traceparent` (`crate::trace`). As text it cost three
//! allocations on each side of every message (the list, its name, its value), its
//! formatting on the sender and its parsing into bytes for the wire (which carries it
//! as 25 bytes, `encode.rs`, `compact_headers`) and back into text on the receiver.
//! [`Headers`] keeps a `traceparent` of the usual form as those 25 bytes and where it
//! stands among the headers, so none of that happens unless someone asks for the text
//! ([`Headers::get`], [`Headers::to_vec`], `Message::headers`). To everything outside,
//! the headers read as the list the sender gave, in its order: serde (the store's
//! records, the full wire dialect) writes and reads them as that list of text pairs.

use std::borrow::Cow;
use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::trace::TRACEPARENT;

/// The bytes of a `traceparent` of the usual form: trace id (16), span id (8), flags (1).
pub(crate) type TraceBytes = [u8; 25];

/// What [`Headers::parts`] gives: the headers kept as text, and the binary `traceparent`
/// with its place among all of them.
pub(crate) type Parts<'h> = (&'h [(String, String)], Option<(usize, &'h TraceBytes)>);

/// The headers of a message: `(name, value)` pairs in the order the sender added them.
///
/// Built from a list (`From<Vec<(String, String)>>`, which keeps the first `traceparent`
/// of the usual form as bytes) or with [`Headers::push`]; read with [`Headers::get`] or
/// [`Headers::to_vec`].
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Headers {
    /// The headers other than [`Headers::trace`], in order.
    list: Vec<(String, String)>,
    /// A `traceparent` of the usual form, as bytes, and its place among all the headers (at
    /// most `list.len()`). A `u16` keeps an envelope small; a `traceparent` further back
    /// stays text.
    trace: Option<(u16, TraceBytes)>,
}

impl Headers {
    /// No headers.
    pub fn new() -> Self {
        Self::default()
    }

    /// How many headers there are.
    pub fn len(&self) -> usize {
        self.list.len() + usize::from(self.trace.is_some())
    }

    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The value of the first header named `name` (case-sensitive).
    pub fn get(&self, name: &str) -> Option<Cow<'_, str>> {
        if name == TRACEPARENT
            && let Some((_, b)) = self.trace
        {
            return Some(match self.text_before_trace() {
                Some(v) => Cow::Borrowed(v),
                None => Cow::Owned(traceparent_text(&b)),
            });
        }
        self.text(name).map(Cow::Borrowed)
    }

    /// A text `traceparent` (one not of the usual form) placed before the one kept as bytes:
    /// it, not the bytes, is the first header of that name.
    fn text_before_trace(&self) -> Option<&str> {
        let (at, _) = self.trace.as_ref()?;
        let before = self.list.get(..usize::from(*at)).unwrap_or_default();
        before
            .iter()
            .find(|(k, _)| k == TRACEPARENT)
            .map(|(_, v)| v.as_str())
    }

    /// All headers as text, in order.
    pub fn to_vec(&self) -> Vec<(String, String)> {
        let mut all = Vec::with_capacity(self.len());
        self.for_each(|k, v| all.push((k.to_string(), v.to_string())));
        all
    }

    /// Adds a header after the others.
    pub fn push(&mut self, name: impl Into<String>, value: impl Into<String>) {
        let (name, value) = (name.into(), value.into());
        if self.trace.is_none()
            && name == TRACEPARENT
            && let Ok(at) = u16::try_from(self.list.len())
            && let Some(b) = binary_traceparent(&value)
        {
            self.trace = Some((at, b));
            return;
        }
        self.list.push((name, value));
    }

    /// The headers as they are when none is kept as bytes.
    pub(crate) fn text_only(&self) -> Option<&[(String, String)]> {
        self.trace.is_none().then_some(self.list.as_slice())
    }

    /// The value of the first header named `name` among those kept as text.
    pub(crate) fn text(&self, name: &str) -> Option<&str> {
        self.list
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The `traceparent` kept as bytes, if any (tests; a message's trace context comes from
    /// [`Headers::first_trace`]).
    #[cfg(test)]
    pub(crate) fn trace(&self) -> Option<&TraceBytes> {
        self.trace.as_ref().map(|(_, b)| b)
    }

    /// The `traceparent` kept as bytes if it is the first header of that name, the one
    /// [`Headers::get`] returns and the message's trace context comes from. A text one
    /// before it (one not of the usual form, as a peer may send) shadows it.
    pub(crate) fn first_trace(&self) -> Option<&TraceBytes> {
        let (_, b) = self.trace.as_ref()?;
        self.text_before_trace().is_none().then_some(b)
    }

    /// Whether any header is named `traceparent` (as bytes or as text).
    pub(crate) fn has_traceparent(&self) -> bool {
        self.trace.is_some() || self.text(TRACEPARENT).is_some()
    }

    /// Adds a `traceparent` of the usual form after the others, as bytes if it can be. The
    /// caller checks that there is none yet ([`Headers::has_traceparent`]).
    pub(crate) fn push_trace(&mut self, b: TraceBytes) {
        match u16::try_from(self.list.len()) {
            Ok(at) if self.trace.is_none() => self.trace = Some((at, b)),
            _ => self
                .list
                .push((TRACEPARENT.to_string(), traceparent_text(&b))),
        }
    }

    /// The headers other than the binary `traceparent`, and that one with its place: what
    /// the compact wire dialect writes.
    pub(crate) fn parts(&self) -> Parts<'_> {
        let trace = self.trace.as_ref().map(|(at, b)| (usize::from(*at), b));
        (&self.list, trace)
    }

    /// Headers read from the compact wire dialect: `list`, with a binary `traceparent` at
    /// `at`. `None` if `at` is past the end of the list, or too far back to keep.
    pub(crate) fn from_parts(
        list: Vec<(String, String)>,
        trace: Option<(usize, TraceBytes)>,
    ) -> Option<Self> {
        let trace = match trace {
            Some((at, b)) if at <= list.len() => Some((u16::try_from(at).ok()?, b)),
            Some(_) => return None,
            None => None,
        };
        Some(Headers { list, trace })
    }

    /// Calls `f` with each header in order, the binary `traceparent` as its text, without
    /// making the list.
    pub(crate) fn for_each(&self, mut f: impl FnMut(&str, &str)) {
        let mut text = [0; 55];
        let mut trace = self
            .trace
            .map(|(at, b)| (usize::from(at), traceparent_into(&b, &mut text)));
        for (i, (k, v)) in self.list.iter().enumerate() {
            if let Some((at, t)) = trace
                && at == i
            {
                f(TRACEPARENT, t);
                trace = None;
            }
            f(k, v);
        }
        if let Some((_, t)) = trace {
            f(TRACEPARENT, t);
        }
    }
}

impl From<Vec<(String, String)>> for Headers {
    /// The headers `list` holds, in order; the first `traceparent` of the usual form is kept
    /// as bytes.
    fn from(mut list: Vec<(String, String)>) -> Self {
        let trace = list.iter().enumerate().find_map(|(i, (k, v))| {
            let at = u16::try_from(i).ok()?;
            (k == TRACEPARENT)
                .then(|| binary_traceparent(v))
                .flatten()
                .map(|b| (at, b))
        });
        if let Some((at, _)) = trace {
            list.remove(usize::from(at));
        }
        Headers { list, trace }
    }
}

impl fmt::Debug for Headers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut list = f.debug_list();
        self.for_each(|k, v| {
            list.entry(&(k, v));
        });
        list.finish()
    }
}

impl Serialize for Headers {
    /// As the list of `(name, value)` pairs in order (what envelopes held before).
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeSeq;
        let mut seq = s.serialize_seq(Some(self.len()))?;
        let mut result = Ok(());
        self.for_each(|k, v| {
            if result.is_ok() {
                result = seq.serialize_element(&(k, v));
            }
        });
        result?;
        seq.end()
    }
}

impl<'de> Deserialize<'de> for Headers {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Vec::<(String, String)>::deserialize(d).map(Headers::from)
    }
}

/// The text of a `traceparent` from its 25 bytes (trace id, span id, flags):
/// `00-<32 hex>-<16 hex>-<2 hex>`, lower-case.
pub(crate) fn traceparent_text(b: &TraceBytes) -> String {
    let mut out = [0; 55];
    traceparent_into(b, &mut out).to_string()
}

/// Writes the text of a `traceparent` into `out` and returns it.
fn traceparent_into<'o>(b: &TraceBytes, out: &'o mut [u8; 55]) -> &'o str {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    *out = *b"00-00000000000000000000000000000000-0000000000000000-00";
    for (i, x) in b.iter().enumerate() {
        let at = traceparent_digit(i);
        out[at] = DIGITS[usize::from(x >> 4)];
        out[at + 1] = DIGITS[usize::from(x & 0xf)];
    }
    // Only ASCII digits and dashes are in it.
    std::str::from_utf8(out).unwrap_or_default()
}

/// Where the two hex digits of byte `i` (below 25) of a binary traceparent stand in its text:
/// the trace id from 3, the span id from 36, the flags at 53.
fn traceparent_digit(i: usize) -> usize {
    3 + 2 * i + usize::from(i >= 16) + usize::from(i >= 24)
}

/// The 25 bytes (trace id, span id, flags) of a `traceparent` value written exactly as
/// `00-<32 hex>-<16 hex>-<2 hex>` with lower-case digits, the only text
/// [`traceparent_text`] gives back; `None` for any other value (kept as text).
pub(crate) fn binary_traceparent(v: &str) -> Option<TraceBytes> {
    let v = v.as_bytes();
    if v.len() != 55 || !v.starts_with(b"00-") || v[35] != b'-' || v[52] != b'-' {
        return None;
    }
    let mut out = [0; 25];
    let mut bad = 0;
    for (i, o) in out.iter_mut().enumerate() {
        let at = traceparent_digit(i);
        let (hi, lo) = (
            HEX_VALUE[usize::from(v[at])],
            HEX_VALUE[usize::from(v[at + 1])],
        );
        bad |= hi | lo;
        *o = hi << 4 | lo;
    }
    (bad <= 15).then_some(out)
}

/// The value of each lower-case hex digit; 255 for every other byte.
static HEX_VALUE: [u8; 256] = {
    let mut t = [255; 256];
    let mut i = 0;
    while i < 10 {
        t[b'0' as usize + i] = i as u8;
        i += 1;
    }
    let mut i = 0;
    while i < 6 {
        t[b'a' as usize + i] = 10 + i as u8;
        i += 1;
    }
    t
};

#[cfg(test)]
mod tests {
    use super::*;

    const TP: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn a_usual_traceparent_is_kept_as_bytes_and_reads_back_in_its_place() {
        let list = pairs(&[("a", "1"), (TRACEPARENT, TP), ("b", "2")]);
        let h = Headers::from(list.clone());
        assert!(h.trace().is_some(), "kept as bytes");
        assert_eq!(h.parts().0, &pairs(&[("a", "1"), ("b", "2")])[..]);
        assert_eq!(h.len(), 3);
        assert_eq!(h.to_vec(), list);
        assert_eq!(h.get(TRACEPARENT).as_deref(), Some(TP));
        assert_eq!(h.get("b").as_deref(), Some("2"));
        assert_eq!(h.text_only(), None);
        assert_eq!(
            Headers::from(pairs(&[("a", "1")])).text_only(),
            Some(&pairs(&[("a", "1")])[..])
        );
    }

    #[test]
    fn other_traceparents_stay_text() {
        // Upper-case digits, another version, a second one after a usual one.
        let upper = TP.to_uppercase();
        let list = pairs(&[
            (TRACEPARENT, &upper),
            (TRACEPARENT, "01-x"),
            (TRACEPARENT, TP),
            (TRACEPARENT, TP),
        ]);
        let h = Headers::from(list.clone());
        assert_eq!(h.parts().1.map(|(at, _)| at), Some(2));
        assert_eq!(h.parts().0.len(), 3);
        assert_eq!(h.to_vec(), list);
        assert_eq!(h.get(TRACEPARENT).as_deref(), Some(upper.as_str()));
    }

    #[test]
    fn pushing_keeps_the_order_and_serde_writes_the_list() {
        let mut h = Headers::new();
        h.push("a", "1");
        h.push(TRACEPARENT, TP);
        h.push("b", "2");
        // A second one stays text.
        h.push(TRACEPARENT, TP);
        assert_eq!(h.parts().1.map(|(at, _)| at), Some(1));
        let list = pairs(&[("a", "1"), (TRACEPARENT, TP), ("b", "2"), (TRACEPARENT, TP)]);
        assert_eq!(h.to_vec(), list);
        let config = bincode::config::standard();
        let ours = bincode::serde::encode_to_vec(&h, config).expect("encodes");
        let theirs = bincode::serde::encode_to_vec(&list, config).expect("encodes");
        assert_eq!(ours, theirs, "the same bytes as the plain list");
        let (back, _): (Headers, _) =
            bincode::serde::decode_from_slice(&ours, config).expect("decodes");
        assert_eq!(back, h);
    }
}
