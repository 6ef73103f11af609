//! Which network interfaces mDNS runs on.

use std::fmt;
use std::str::FromStr;

/// The longest interface name Linux accepts (`IFNAMSIZ` - 1).
const MAX_INTERFACE_NAME: usize = 15;

/// The network interfaces [`MdnsDiscovery`](crate::MdnsDiscovery) joins the mDNS
/// group on and sends on. Parsed from `"all"`, `"loopback"` or a comma-separated
/// list of names such as `"eth0,eth1"`.
///
/// The default is [`Interfaces::All`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Interfaces {
    /// Every non-loopback interface (IPv4 and IPv6): the choice for a real LAN.
    #[default]
    All,
    /// Only the IPv4 loopback interface: several nodes on one host (tests, the
    /// demo). Nothing is sent on any other interface.
    Loopback,
    /// Only the interfaces with these names (e.g. `eth0`), IPv4 and IPv6.
    Named(Vec<String>),
}

impl fmt::Display for Interfaces {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Interfaces::All => f.write_str("all"),
            Interfaces::Loopback => f.write_str("loopback"),
            Interfaces::Named(names) => f.write_str(&names.join(",")),
        }
    }
}

/// Why a string is not an [`Interfaces`] value.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid interface selection `{input}`: {reason}; expected `all`, `loopback` or a \
     comma-separated list of interface names such as `eth0,eth1`"
)]
pub struct InterfacesParseError {
    input: String,
    reason: String,
}

impl InterfacesParseError {
    fn new(input: &str, reason: impl Into<String>) -> Self {
        Self {
            input: input.to_owned(),
            reason: reason.into(),
        }
    }
}

impl FromStr for Interfaces {
    type Err = InterfacesParseError;

    /// `all` and `loopback` (any case, surrounding spaces ignored), or interface
    /// names separated by commas. A name is 1 to 15 bytes without whitespace,
    /// `/`, `:` or `,`; duplicates are removed, order is kept.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let trimmed = s.trim();
        if trimmed.eq_ignore_ascii_case("all") {
            return Ok(Interfaces::All);
        }
        if trimmed.eq_ignore_ascii_case("loopback") {
            return Ok(Interfaces::Loopback);
        }
        if trimmed.is_empty() {
            return Err(InterfacesParseError::new(s, "it is empty"));
        }
        let mut names: Vec<String> = Vec::new();
        for part in trimmed.split(',') {
            let name = part.trim();
            if name.is_empty() {
                return Err(InterfacesParseError::new(s, "it has an empty name"));
            }
            if name.len() > MAX_INTERFACE_NAME {
                return Err(InterfacesParseError::new(
                    s,
                    format!("`{name}` is longer than {MAX_INTERFACE_NAME} bytes"),
                ));
            }
            if let Some(c) = name
                .chars()
                .find(|c| c.is_whitespace() || c.is_control() || matches!(c, '/' | ':'))
            {
                return Err(InterfacesParseError::new(
                    s,
                    format!("`{name}` contains the character {c:?}"),
                ));
            }
            if name.eq_ignore_ascii_case("all") || name.eq_ignore_ascii_case("loopback") {
                return Err(InterfacesParseError::new(
                    s,
                    format!("`{name}` cannot be combined with interface names"),
                ));
            }
            if !names.iter().any(|n| n == name) {
                names.push(name.to_owned());
            }
        }
        Ok(Interfaces::Named(names))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(input: &str, expected: Result<Interfaces, &str>) {
        let got = input.parse::<Interfaces>();
        match (&got, &expected) {
            (Ok(g), Ok(e)) => assert_eq!(g, e, "input {input:?}"),
            (Err(g), Err(fragment)) => {
                let msg = g.to_string();
                assert!(msg.contains(fragment), "input {input:?}: {msg}");
                assert!(msg.contains("expected `all`, `loopback`"), "{msg}");
            }
            _ => panic!("input {input:?}: got {got:?}, expected {expected:?}"),
        }
    }

    fn named(names: &[&str]) -> Interfaces {
        Interfaces::Named(names.iter().map(|n| n.to_string()).collect())
    }

    #[test]
    fn parses_the_documented_forms() {
        check("all", Ok(Interfaces::All));
        check("ALL", Ok(Interfaces::All));
        check(" loopback ", Ok(Interfaces::Loopback));
        check("Loopback", Ok(Interfaces::Loopback));
        check("eth0", Ok(named(&["eth0"])));
        check("lo", Ok(named(&["lo"])));
        check("eth0,eth1", Ok(named(&["eth0", "eth1"])));
        check(" eth0 , wlan0 ", Ok(named(&["eth0", "wlan0"])));
        check("eth0,eth0,eth1", Ok(named(&["eth0", "eth1"])));
        check("br-1a2b3c4d5e6f", Ok(named(&["br-1a2b3c4d5e6f"])));
    }

    #[test]
    fn rejects_garbage_with_a_reason() {
        check("", Err("it is empty"));
        check("   ", Err("it is empty"));
        check(",", Err("empty name"));
        check("eth0,", Err("empty name"));
        check("eth0,,eth1", Err("empty name"));
        check("averyveryverylongname", Err("longer than 15 bytes"));
        check("eth 0", Err("contains the character ' '"));
        check("eth0/1", Err("contains the character '/'"));
        check("eth0:1", Err("contains the character ':'"));
        check("all,eth0", Err("cannot be combined"));
        check("eth0,loopback", Err("cannot be combined"));
    }

    #[test]
    fn display_round_trips() {
        for s in ["all", "loopback", "eth0", "eth0,eth1"] {
            let parsed: Interfaces = s.parse().unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(parsed.to_string(), s);
        }
        assert_eq!(Interfaces::default(), Interfaces::All);
    }
}
