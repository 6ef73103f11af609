//! The demo's invariants, computed from what the services reported.
//!
//! - `sent`: checkouts whose `payment.succeeded` was accepted (durably stored) by payments.
//! - `delivered`: distinct (group, order) pairs handled, so one per group copy: with three
//!   groups and nothing lost, `delivered = 3 × sent`.
//! - `lost`: (group, order) pairs accepted but never handled by that group.
//! - `duplicates`: handler runs beyond the first for a (group, order) pair. At-least-once
//!   delivery allows them: a consumer killed after its handler ran and before its ack reached
//!   payments sees the message again after a restart.
//! - `order_violations`: a first handling of a key's order whose per-key sequence is lower
//!   than one the group already handled for that key. Reports from two instances travel on
//!   different pipes, so this check relies on a key staying with one instance, which holds in
//!   the demo (no `orders` instance stops).
//!
//! Memory: one entry per accepted order and per (group, order) handled; the demo bounds the
//! orders by `--rate` × `--duration` (at most [`super::MAX_ORDERS`]).

use std::collections::{BTreeMap, HashMap};

/// Most order violations kept as examples for the summary.
const MAX_EXAMPLES: usize = 10;

/// What a handled report turned out to be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// The group's first handling of the order, in key order.
    First,
    /// The group handled the order before.
    Duplicate,
    /// The group's first handling of the order, after a later order of the same key.
    OutOfOrder,
}

/// Per-group figures.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct GroupFigures {
    /// Distinct orders handled.
    pub(crate) delivered: u64,
    /// Accepted orders not handled.
    pub(crate) lost: u64,
    /// Handler runs beyond the first.
    pub(crate) duplicates: u64,
    /// Out-of-order first handlings.
    pub(crate) order_violations: u64,
    /// Distinct orders handled per instance.
    pub(crate) by_instance: BTreeMap<String, u64>,
}

/// The whole run's figures.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Figures {
    /// Orders accepted by payments.
    pub(crate) sent: u64,
    /// Sum of the groups' `delivered`.
    pub(crate) delivered: u64,
    /// Sum of the groups' `lost`.
    pub(crate) lost: u64,
    /// Sum of the groups' `duplicates`.
    pub(crate) duplicates: u64,
    /// Sum of the groups' `order_violations`.
    pub(crate) order_violations: u64,
    /// Per group, in the order given to [`Checker::new`].
    pub(crate) groups: Vec<(String, GroupFigures)>,
}

impl Figures {
    /// The script-friendly last line.
    pub(crate) fn summary_line(&self) -> String {
        format!(
            "summary: sent={} delivered={} lost={} duplicates={} order_violations={}",
            self.sent, self.delivered, self.lost, self.duplicates, self.order_violations
        )
    }

    /// Whether the invariants held: something was sent, nothing lost, no key out of order.
    pub(crate) fn held(&self) -> bool {
        self.sent > 0 && self.lost == 0 && self.order_violations == 0
    }
}

#[derive(Debug, Default)]
struct Group {
    /// Handler runs per order.
    runs: HashMap<u64, u32>,
    /// Highest sequence handled per key.
    last_seq: HashMap<String, u64>,
    duplicates: u64,
    order_violations: u64,
    by_instance: BTreeMap<String, u64>,
}

/// Collects reports and computes [`Figures`].
#[derive(Debug)]
pub(crate) struct Checker {
    groups: Vec<(String, Group)>,
    /// Accepted orders: order id → (key, seq).
    accepted: BTreeMap<u64, (String, u64)>,
    /// Examples of order violations, for the summary.
    examples: Vec<String>,
}

impl Checker {
    /// A checker for the given subscriber groups.
    pub(crate) fn new(groups: &[&str]) -> Self {
        Self {
            groups: groups
                .iter()
                .map(|g| ((*g).to_string(), Group::default()))
                .collect(),
            accepted: BTreeMap::new(),
            examples: Vec::new(),
        }
    }

    /// Payments accepted `order`.
    pub(crate) fn accepted(&mut self, order: u64, key: &str, seq: u64) {
        self.accepted.insert(order, (key.to_string(), seq));
    }

    /// `instance` of `group` handled `order`. Reports for unknown groups are ignored.
    pub(crate) fn handled(
        &mut self,
        group: &str,
        instance: &str,
        order: u64,
        key: &str,
        seq: u64,
    ) -> Option<Outcome> {
        let (_, g) = self.groups.iter_mut().find(|(name, _)| name == group)?;
        let runs = g.runs.entry(order).or_default();
        *runs += 1;
        if *runs > 1 {
            g.duplicates += 1;
            return Some(Outcome::Duplicate);
        }
        *g.by_instance.entry(instance.to_string()).or_default() += 1;
        let last = g.last_seq.entry(key.to_string()).or_insert(seq);
        if seq < *last {
            g.order_violations += 1;
            if self.examples.len() < MAX_EXAMPLES {
                self.examples.push(format!(
                    "{group}: {instance} handled order {order} ({key} #{seq}) after {key} #{last}"
                ));
            }
            return Some(Outcome::OutOfOrder);
        }
        *last = seq;
        Some(Outcome::First)
    }

    /// Orders accepted so far.
    pub(crate) fn sent(&self) -> u64 {
        self.accepted.len() as u64
    }

    /// Distinct orders `group` handled so far.
    pub(crate) fn delivered_to(&self, group: &str) -> u64 {
        self.groups
            .iter()
            .find(|(name, _)| name == group)
            .map_or(0, |(_, g)| g.runs.len() as u64)
    }

    /// Examples of order violations (at most ten).
    pub(crate) fn examples(&self) -> &[String] {
        &self.examples
    }

    /// The figures now.
    pub(crate) fn figures(&self) -> Figures {
        let mut f = Figures {
            sent: self.sent(),
            ..Figures::default()
        };
        for (name, g) in &self.groups {
            let lost = self
                .accepted
                .keys()
                .filter(|o| !g.runs.contains_key(o))
                .count() as u64;
            let gf = GroupFigures {
                delivered: g
                    .runs
                    .keys()
                    .filter(|o| self.accepted.contains_key(o))
                    .count() as u64,
                lost,
                duplicates: g.duplicates,
                order_violations: g.order_violations,
                by_instance: g.by_instance.clone(),
            };
            f.delivered += gf.delivered;
            f.lost += gf.lost;
            f.duplicates += gf.duplicates;
            f.order_violations += gf.order_violations;
            f.groups.push((name.clone(), gf));
        }
        f
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `accepted` orders (order, key, seq) and `handled` reports (group, order), then
    /// compares the summary line.
    fn check(accepted: &[(u64, &str, u64)], handled: &[(&str, u64)], expected: &str) {
        let mut c = Checker::new(&["a", "b"]);
        for (order, key, seq) in accepted {
            c.accepted(*order, key, *seq);
        }
        for (group, order) in handled {
            let (key, seq) = accepted
                .iter()
                .find(|(o, _, _)| o == order)
                .map_or(("k?", 0), |(_, k, s)| (*k, *s));
            c.handled(group, "i", *order, key, seq);
        }
        assert_eq!(c.figures().summary_line(), format!("summary: {expected}"));
    }

    const THREE: [(u64, &str, u64); 3] = [(1, "x", 1), (2, "y", 1), (3, "x", 2)];

    #[test]
    fn everything_handled_once_holds() {
        check(
            &THREE,
            &[("a", 1), ("a", 2), ("a", 3), ("b", 2), ("b", 1), ("b", 3)],
            "sent=3 delivered=6 lost=0 duplicates=0 order_violations=0",
        );
    }

    #[test]
    fn a_missing_copy_is_lost() {
        let mut c = Checker::new(&["a", "b"]);
        for (o, k, s) in THREE {
            c.accepted(o, k, s);
            c.handled("a", "i", o, k, s);
        }
        c.handled("b", "i", 1, "x", 1);
        let f = c.figures();
        assert_eq!(f.lost, 2);
        assert!(!f.held());
    }

    #[test]
    fn a_second_run_is_a_duplicate_not_an_error() {
        check(
            &THREE,
            &[
                ("a", 1),
                ("a", 1),
                ("a", 2),
                ("a", 3),
                ("b", 1),
                ("b", 2),
                ("b", 3),
                ("b", 3),
            ],
            "sent=3 delivered=6 lost=0 duplicates=2 order_violations=0",
        );
    }

    #[test]
    fn a_key_out_of_order_is_a_violation() {
        check(
            &THREE,
            &[("a", 3), ("a", 1), ("a", 2), ("b", 1), ("b", 2), ("b", 3)],
            "sent=3 delivered=6 lost=0 duplicates=0 order_violations=1",
        );
    }

    #[test]
    fn nothing_sent_does_not_hold() {
        assert!(!Checker::new(&["a"]).figures().held());
    }
}
