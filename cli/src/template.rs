//! Payload and key templates for `send --count` and `pub --count`.
//!
//! `{i}` becomes the message index (0-based) and `{i%M}` the index modulo `M`
//! (`M` > 0). Any other text, braces included, is kept as it is, so JSON
//! payloads such as `{"n":{i}}` work.

use std::fmt::Write as _;

/// One piece of a parsed template.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Part {
    /// Text copied as it is.
    Literal(String),
    /// `{i}` (`None`) or `{i%M}` (`Some(M)`).
    Index(Option<u64>),
}

/// A parsed template: render it once per message index.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Template {
    parts: Vec<Part>,
}

impl Template {
    /// Parses `text`. Fails on a `{i%…}` placeholder whose modulus is not a positive integer.
    pub(crate) fn parse(text: &str) -> Result<Self, String> {
        let mut parts = Vec::new();
        let mut literal = String::new();
        let mut rest = text;
        while let Some(start) = rest.find("{i") {
            literal.push_str(&rest[..start]);
            let after = &rest[start + 2..];
            if let Some(tail) = after.strip_prefix('}') {
                push_literal(&mut parts, &mut literal);
                parts.push(Part::Index(None));
                rest = tail;
            } else if let Some(modulus) = after.strip_prefix('%') {
                let end = modulus.find('}').ok_or_else(|| {
                    format!("unterminated placeholder in `{text}`: expected `{{i%M}}`")
                })?;
                let m: u64 = modulus[..end]
                    .parse()
                    .ok()
                    .filter(|m| *m > 0)
                    .ok_or_else(|| {
                        format!(
                            "invalid placeholder `{{i%{}}}` in `{text}`: M must be a positive \
                             integer",
                            &modulus[..end]
                        )
                    })?;
                push_literal(&mut parts, &mut literal);
                parts.push(Part::Index(Some(m)));
                rest = &modulus[end + 1..];
            } else {
                // `{id}`, `{if…`: not a placeholder.
                literal.push_str("{i");
                rest = after;
            }
        }
        literal.push_str(rest);
        push_literal(&mut parts, &mut literal);
        Ok(Self { parts })
    }

    /// A template that is used as it is (no placeholders are recognised).
    pub(crate) fn verbatim(text: &str) -> Self {
        Self {
            parts: vec![Part::Literal(text.to_string())],
        }
    }

    /// The text for message `index`.
    pub(crate) fn render(&self, index: u64) -> String {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Literal(s) => out.push_str(s),
                // Writing to a String cannot fail.
                Part::Index(None) => {
                    let _ = write!(out, "{index}");
                }
                Part::Index(Some(m)) => {
                    let _ = write!(out, "{}", index % m);
                }
            }
        }
        out
    }
}

fn push_literal(parts: &mut Vec<Part>, literal: &mut String) {
    if !literal.is_empty() {
        parts.push(Part::Literal(std::mem::take(literal)));
    }
}

#[cfg(test)]
mod tests {
    use super::Template;

    fn check(template: &str, index: u64, expected: &str) {
        let t = Template::parse(template).expect("valid template");
        assert_eq!(
            t.render(index),
            expected,
            "template {template:?} at index {index}"
        );
    }

    #[test]
    fn renders_placeholders() {
        check("order {i}", 7, "order 7");
        check("{i}", 0, "0");
        check("k-{i%4}", 10, "k-2");
        check("{i%1}", 99, "0");
        check("{i}/{i%3}/{i}", 5, "5/2/5");
        check("no placeholder", 3, "no placeholder");
        check("", 3, "");
    }

    #[test]
    fn keeps_other_braces() {
        check(r#"{"n":{i},"k":"{i%2}"}"#, 3, r#"{"n":3,"k":"1"}"#);
        check("{id} {i", 1, "{id} {i");
        check("{{i}}", 4, "{4}");
        check("{ i }", 4, "{ i }");
    }

    #[test]
    fn rejects_bad_modulus() {
        for bad in ["{i%0}", "{i%x}", "{i%}", "{i%-1}", "{i%3"] {
            assert!(Template::parse(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn verbatim_keeps_placeholders() {
        assert_eq!(Template::verbatim("a {i}").render(9), "a {i}");
    }
}
