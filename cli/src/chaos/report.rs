//! The end of a chaos run: the table on stdout, the JSON report and its HTML page.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context;
use serde::Serialize;
use serde_json::json;

use super::checker::{DuplicateExample, Findings, MeshCaRun, SlowestDelivery};

/// One progress sample (taken about every second).
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Sample {
    /// Seconds since the workload started.
    pub(crate) t: f64,
    /// Messages acknowledged per second since the previous sample.
    pub(crate) sent_per_s: f64,
    /// Handler runs per second since the previous sample.
    pub(crate) handled_per_s: f64,
    /// Entries waiting or in flight in every answering node's logs.
    pub(crate) backlog: u64,
    /// Nodes whose control socket answered.
    pub(crate) answered: usize,
}

/// A fault in the report (seconds since the workload started).
#[derive(Clone, Debug, Serialize)]
pub(crate) struct FaultView {
    /// `kill`, `freeze`, `restart` or `partition`.
    pub(crate) kind: String,
    /// `node-2`, or `node-1|node-3` for a partition.
    pub(crate) target: String,
    /// When it began.
    pub(crate) start: f64,
    /// When it was lifted.
    pub(crate) end: f64,
    /// Seconds from its end until everything accepted before then was handled.
    pub(crate) drain_seconds: Option<f64>,
    /// The message that drain waited for last, when it was handled after the fault's end
    /// (its times in µs since the Unix epoch, to find it in the nodes' logs).
    pub(crate) slowest: Option<SlowestDelivery>,
}

/// How the faults of one kind drained (see [`FaultView::drain_seconds`]).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub(crate) struct DrainSummary {
    /// Faults of the kind.
    pub(crate) faults: usize,
    /// Of those, the ones after which everything accepted before their end was handled.
    pub(crate) drained: usize,
    /// Mean and longest drain of those, in seconds (0 when none drained).
    pub(crate) mean_seconds: f64,
    pub(crate) max_seconds: f64,
}

/// The drains of `faults` by kind, kinds in name order.
pub(crate) fn drain_by_kind(faults: &[FaultView]) -> BTreeMap<String, DrainSummary> {
    let mut by_kind: BTreeMap<String, Vec<Option<f64>>> = BTreeMap::new();
    for f in faults {
        by_kind
            .entry(f.kind.clone())
            .or_default()
            .push(f.drain_seconds);
    }
    by_kind
        .into_iter()
        .map(|(kind, drains)| {
            let done: Vec<f64> = drains.iter().flatten().copied().collect();
            let summary = DrainSummary {
                faults: drains.len(),
                drained: done.len(),
                mean_seconds: if done.is_empty() {
                    0.0
                } else {
                    done.iter().sum::<f64>() / done.len() as f64
                },
                max_seconds: done.iter().copied().fold(0.0, f64::max),
            };
            (kind, summary)
        })
        .collect()
}

/// Everything a run produced.
#[derive(Debug)]
pub(crate) struct RunReport {
    /// The settings, as given.
    pub(crate) settings: serde_json::Value,
    /// The checker's findings.
    pub(crate) findings: Findings,
    /// Faults injected.
    pub(crate) faults: Vec<FaultView>,
    /// Progress samples.
    pub(crate) samples: Vec<Sample>,
    /// Largest total backlog seen.
    pub(crate) peak_backlog: u64,
    /// Largest backlog seen per node.
    pub(crate) peak_backlog_per_node: Vec<u64>,
    /// Seconds from the end of the workload until every accepted message was handled (or the
    /// wait gave up).
    pub(crate) final_drain_seconds: f64,
    /// The run directory (journals, node logs).
    pub(crate) dir: String,
}

/// Counts by name as `shutdown 12, unresponsive 3` (close codes, request errors), or `none`.
fn counts_text(counts: &BTreeMap<String, u64>) -> String {
    let parts: Vec<String> = counts
        .iter()
        .map(|(code, n)| format!("{code} {n}"))
        .collect();
    if parts.is_empty() {
        "none".into()
    } else {
        parts.join(", ")
    }
}

fn secs(v: Option<f64>) -> String {
    v.map_or_else(|| "never".to_string(), |s| format!("{s:.2}"))
}

impl RunReport {
    /// The JSON report (top-level `accepted`, `delivered`, `lost`, `duplicates`,
    /// `order_violations`, `faults`, `drain_seconds`, …).
    pub(crate) fn to_json(&self) -> serde_json::Value {
        let f = &self.findings;
        json!({
            "ok": f.ok(),
            "accepted": f.accepted,
            "delivered": f.delivered,
            "lost": f.lost,
            "undrained": f.undrained,
            "duplicates": f.duplicates,
            "duplicates_explained_by_crash": f.duplicates_explained,
            "duplicates_after_sender_kill": f.duplicates_after_sender_kill,
            "duplicates_behind_their_key": f.duplicates_behind_their_key,
            "duplicate_causes": f.duplicate_causes,
            "order_violations": f.order_violations,
            "protocol_faults": f.protocol_faults,
            "closes": f.closes,
            "redelivered": f.redelivered,
            "duplicates_dropped": f.duplicates_dropped,
            "mesh_ca": f.mesh_ca,
            "key_rotation": f.key_rotation,
            "faults": self.faults,
            "drain_seconds": self.faults.iter().map(|x| x.drain_seconds).collect::<Vec<_>>(),
            "drain_by_kind": drain_by_kind(&self.faults),
            "peak_log_depth": self.peak_backlog,
            "peak_log_depth_per_node": self.peak_backlog_per_node,
            "final_drain_seconds": self.final_drain_seconds,
            "settings": self.settings,
            "findings": f,
            "samples": self.samples,
            "dir": self.dir,
        })
    }

    /// The table printed at the end of a run.
    pub(crate) fn table(&self) -> String {
        let f = &self.findings;
        let mut s = String::new();
        let verdict = |ok: bool| if ok { "ok" } else { "FAIL" };
        let _ = writeln!(s, "\nfaults");
        let _ = writeln!(
            s,
            "  {:>3}  {:<10} {:<16} {:>8} {:>8} {:>10}  waited for last",
            "#", "kind", "target", "start s", "end s", "drain s"
        );
        for (i, x) in self.faults.iter().enumerate() {
            let last = x.slowest.as_ref().map_or_else(String::new, slowest_text);
            let _ = writeln!(
                s,
                "  {:>3}  {:<10} {:<16} {:>8.2} {:>8.2} {:>10}  {last}",
                i + 1,
                x.kind,
                x.target,
                x.start,
                x.end,
                secs(x.drain_seconds)
            );
        }
        for (kind, d) in drain_by_kind(&self.faults) {
            let never = d.faults - d.drained;
            let _ = writeln!(
                s,
                "       {kind:<10} {:>3} fault{}, drained in {:.2} s on average, {:.2} s at most{}",
                d.faults,
                if d.faults == 1 { "" } else { "s" },
                d.mean_seconds,
                d.max_seconds,
                if never > 0 {
                    format!(", {never} never")
                } else {
                    String::new()
                }
            );
        }
        let _ = writeln!(s, "\nresult");
        let mut rows: Vec<(&str, String, &str)> = vec![
            (
                "accepted",
                format!(
                    "{} ({} sends, {} publishes)",
                    f.accepted, f.accepted_sends, f.accepted_publishes
                ),
                "",
            ),
            ("delivered", f.delivered.to_string(), ""),
            ("lost", f.lost.to_string(), verdict(f.lost == 0)),
            (
                "undrained",
                format!(
                    "{} (not handled when the drain wait ended, still in their senders' logs)",
                    f.undrained
                ),
                verdict(f.undrained == 0),
            ),
            (
                "order violations",
                f.order_violations.to_string(),
                verdict(f.order_violations == 0),
            ),
            (
                "duplicates",
                format!(
                    "{} ({} after a kill of the handler, {} of the sender; {} behind a later message of their key)",
                    f.duplicates,
                    f.duplicates_explained,
                    f.duplicates_after_sender_kill,
                    f.duplicates_behind_their_key
                ),
                "",
            ),
            (
                "redelivered",
                format!(
                    "{} (sent again by their senders; {} copies dropped by dedup)",
                    f.redelivered, f.duplicates_dropped
                ),
                "",
            ),
            (
                "phantom deliveries",
                f.phantoms.to_string(),
                verdict(f.phantoms == 0),
            ),
            (
                "protocol faults",
                format!(
                    "{} (connections closed: {})",
                    f.protocol_faults,
                    counts_text(&f.closes)
                ),
                verdict(f.protocol_faults == 0),
            ),
            (
                "short publishes",
                format!(
                    "{} (receipt covered fewer groups than exist)",
                    f.short_publishes
                ),
                "",
            ),
            ("send errors", f.failed.to_string(), ""),
            (
                "requests answered",
                format!(
                    "{} of {} (failed: {}; slowest {} ms)",
                    f.requests_answered,
                    f.requests,
                    counts_text(&f.request_errors),
                    f.request_max_ms
                ),
                "",
            ),
            (
                "replies to the wrong request",
                f.requests_wrong.to_string(),
                verdict(f.requests_wrong == 0),
            ),
            (
                "requests never ended",
                format!(
                    "{} of {} begun ({} cut short by a kill of their node)",
                    f.requests_unended, f.requests_begun, f.requests_cut_by_kill
                ),
                verdict(f.requests_unended == 0),
            ),
            (
                "requests past their deadline",
                format!(
                    "{} (over {} ms late; {} more while their node was frozen)",
                    f.requests_late,
                    super::checker::LATE_SLACK_MS,
                    f.requests_late_frozen
                ),
                verdict(f.requests_late == 0),
            ),
            (
                "handled, send unacknowledged",
                f.handled_unacknowledged.to_string(),
                "",
            ),
            ("peak log depth", self.peak_backlog.to_string(), ""),
            (
                "latency p50 / max",
                format!("{:.3} s / {:.3} s", f.latency_p50_s, f.latency_max_s),
                "",
            ),
            (
                "final drain",
                format!("{:.2} s", self.final_drain_seconds),
                "",
            ),
        ];
        if let Some(r) = &f.mesh_ca {
            let [list, cut_off, renewal] = mesh_ca_text(r);
            rows.push(("revocation list held by", list, verdict(r.list_ok())));
            rows.push((
                "got through while cut off",
                cut_off,
                verdict(r.cut_off_ok()),
            ));
            rows.push((
                "renewed certificate presented by",
                renewal,
                verdict(r.renewal_ok()),
            ));
        }
        if let Some(r) = &f.key_rotation {
            rows.push(("mesh key rotation", r.text(), verdict(r.ok())));
        }
        for (k, v, ok) in rows {
            let _ = writeln!(s, "  {k:<30} {v:<52} {ok}");
        }
        for (cause, n) in &f.duplicate_causes {
            let _ = writeln!(s, "    duplicates after {cause:<40} {n}");
        }
        for d in f.duplicate_examples.iter().take(10) {
            let _ = writeln!(s, "    duplicate: {}", duplicate_text(d));
        }
        let unhandled = [
            ("lost", &f.lost_messages),
            ("undrained", &f.undrained_messages),
        ];
        for (what, messages) in unhandled {
            for m in messages.iter().take(10) {
                let _ = writeln!(
                    s,
                    "  {what}: {} (missing {}; receipt copies {})",
                    m.message,
                    m.missing.join(","),
                    m.copies
                );
            }
        }
        for q in f.request_problems.iter().take(10) {
            let _ = writeln!(
                s,
                "  request: node-{}'s request {} to {} (timeout {} ms) {}",
                q.origin,
                q.request,
                q.service,
                q.timeout_ms,
                q.ms.map_or_else(
                    || "never ended".to_string(),
                    |ms| format!("ended after {ms} ms")
                )
            );
        }
        for v in f.order_examples.iter().take(10) {
            let _ = writeln!(
                s,
                "  order: {} handled node-{}'s {} key {}#{} after #{} (on node-{})",
                v.consumer, v.origin, v.destination, v.key, v.key_seq, v.after, v.by
            );
        }
        let _ = writeln!(
            s,
            "\n{}",
            match (f.ok(), f.mesh_ca.is_some(), f.key_rotation.is_some()) {
                (true, false, false) => {
                    "PASS: no acknowledged message lost, none out of key order, no protocol \
                     fault, no reply to the wrong request, every request ended by its deadline"
                }
                (true, true, _) => {
                    "PASS: no acknowledged message lost, none out of key order, no protocol \
                     fault, no reply to the wrong request, every request ended by its deadline, \
                     the mesh CA's revocation list reached every node and cut off the node it \
                     revoked, and every node presents its renewed certificate"
                }
                (true, false, true) => {
                    "PASS: no acknowledged message lost, none out of key order, no protocol \
                     fault, no reply to the wrong request, every request ended by its deadline, \
                     and every node took each step of the mesh key rotation and proves and \
                     accepts the new key alone"
                }
                (false, ..) => "FAIL: invariants broken (see above)",
            }
        );
        if f.undrained > 0 {
            let _ = writeln!(
                s,
                "{} accepted messages were kept in their senders' logs but not handled before the \
                 drain wait ended: the consumers did not keep up (a longer --drain-timeout or a \
                 lower --rate tells a slow drain from a stuck one)",
                f.undrained
            );
        }
        s
    }

    /// Writes the JSON report to `path` and the HTML page next to it (`.html`).
    pub(crate) fn write(&self, path: &Path) -> anyhow::Result<()> {
        let text = serde_json::to_string_pretty(&self.to_json())?;
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
        let html = path.with_extension("html");
        std::fs::write(&html, self.html())
            .with_context(|| format!("writing {}", html.display()))?;
        Ok(())
    }

    /// A self-contained HTML page: the result and an inline SVG plot of throughput and backlog
    /// over time, faults shaded.
    pub(crate) fn html(&self) -> String {
        let f = &self.findings;
        let (w, h, ml, mr, mt, mb) = (960.0, 360.0, 60.0, 60.0, 20.0, 40.0);
        let pw = w - ml - mr;
        let ph = h - mt - mb;
        let t_max = self.samples.iter().map(|s| s.t).fold(1.0_f64, f64::max);
        let rate_max = self
            .samples
            .iter()
            .map(|s| s.sent_per_s.max(s.handled_per_s))
            .fold(1.0_f64, f64::max);
        let back_max = self
            .samples
            .iter()
            .map(|s| s.backlog as f64)
            .fold(1.0, f64::max);
        let x = |t: f64| ml + pw * t / t_max;
        let yr = |v: f64| mt + ph * (1.0 - v / rate_max);
        let yb = |v: f64| mt + ph * (1.0 - v / back_max);
        let mut svg = String::new();
        let _ = write!(
            svg,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="11">"#
        );
        let colors = |k: &str| match k {
            "kill" => "#e57373",
            "freeze" => "#64b5f6",
            "restart" => "#ffb74d",
            _ => "#ba68c8",
        };
        for fv in &self.faults {
            let (x0, x1) = (x(fv.start), x(fv.end).max(x(fv.start) + 2.0));
            let _ = write!(
                svg,
                r##"<rect x="{x0:.1}" y="{mt}" width="{:.1}" height="{ph}" fill="{}" opacity="0.35"><title>{} {} {:.1}-{:.1}s drain {}</title></rect><text x="{x0:.1}" y="{:.1}" fill="#333">{}</text>"##,
                x1 - x0,
                colors(&fv.kind),
                fv.kind,
                fv.target,
                fv.start,
                fv.end,
                secs(fv.drain_seconds),
                mt + 10.0,
                &fv.kind[..1].to_uppercase()
            );
        }
        let line = |pts: Vec<(f64, f64)>, color: &str| {
            let d: Vec<String> = pts.iter().map(|(a, b)| format!("{a:.1},{b:.1}")).collect();
            format!(
                r#"<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{}"/>"#,
                d.join(" ")
            )
        };
        svg.push_str(&line(
            self.samples
                .iter()
                .map(|s| (x(s.t), yr(s.sent_per_s)))
                .collect(),
            "#1b5e20",
        ));
        svg.push_str(&line(
            self.samples
                .iter()
                .map(|s| (x(s.t), yr(s.handled_per_s)))
                .collect(),
            "#0d47a1",
        ));
        svg.push_str(&line(
            self.samples
                .iter()
                .map(|s| (x(s.t), yb(s.backlog as f64)))
                .collect(),
            "#b71c1c",
        ));
        // A `--mesh-ca` run's revocation and renewal, and a `--rotate-key` run's steps written
        // while the faults ran, as dashed lines across the plot.
        let steps: Vec<(f64, String)> = f
            .key_rotation
            .iter()
            .flat_map(|r| &r.steps)
            .filter(|s| s.under_faults)
            .map(|s| (s.written_at_s, format!("key step {}", s.step)))
            .collect();
        for (at, label) in f
            .mesh_ca
            .iter()
            .flat_map(|r| {
                [
                    (r.revoked_at_s, "revoked".to_string()),
                    (r.renewed_at_s, "renewed".to_string()),
                ]
            })
            .chain(steps)
        {
            let _ = write!(
                svg,
                r##"<line x1="{x:.1}" y1="{mt}" x2="{x:.1}" y2="{:.1}" stroke="#555" stroke-dasharray="4 3"/><text x="{:.1}" y="{:.1}" fill="#555">{label}</text>"##,
                mt + ph,
                x(at) + 3.0,
                mt + ph - 4.0,
                x = x(at),
            );
        }
        let _ = write!(
            svg,
            r##"<rect x="{ml}" y="{mt}" width="{pw}" height="{ph}" fill="none" stroke="#999"/><text x="{ml}" y="{:.1}">0 s</text><text x="{:.1}" y="{:.1}" text-anchor="end">{t_max:.0} s</text><text x="{:.1}" y="{:.1}" text-anchor="end">{rate_max:.0}/s</text><text x="{:.1}" y="{:.1}">{back_max:.0}</text>"##,
            h - mb + 14.0,
            ml + pw,
            h - mb + 14.0,
            ml - 4.0,
            mt + 10.0,
            ml + pw + 4.0,
            mt + 10.0
        );
        let _ = write!(
            svg,
            r##"<text x="{ml}" y="{:.1}"><tspan fill="#1b5e20">— sent/s</tspan>  <tspan fill="#0d47a1">— handled/s</tspan>  <tspan fill="#b71c1c">— backlog (right axis)</tspan>  K kill · F freeze · R restart · P partition · O one-way partition</text></svg>"##,
            h - 8.0
        );
        let mesh_ca = f.mesh_ca.as_ref().map_or_else(String::new, |r| {
            let [list, cut_off, renewal] = mesh_ca_text(r);
            format!(
                "<h2>Mesh CA</h2><p>revocation list held by {} · got through while cut off: {} \
                 · renewed certificate presented by {}</p>",
                escape(&list),
                escape(&cut_off),
                escape(&renewal)
            )
        });
        let key_rotation = f.key_rotation.as_ref().map_or_else(String::new, |r| {
            format!("<h2>Mesh key rotation</h2><p>{}</p>", escape(&r.text()))
        });
        let mut rows = String::new();
        for (i, fv) in self.faults.iter().enumerate() {
            let _ = write!(
                rows,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{:.2}</td><td>{:.2}</td><td>{}</td><td>{}</td></tr>",
                i + 1,
                fv.kind,
                fv.target,
                fv.start,
                fv.end,
                secs(fv.drain_seconds),
                escape(&fv.slowest.as_ref().map_or_else(String::new, slowest_text))
            );
        }
        let mut duplicates = String::new();
        if !f.duplicate_examples.is_empty() {
            let _ = write!(
                duplicates,
                "<h2>Duplicates</h2><p>the first {} of {}</p><ul>",
                f.duplicate_examples.len(),
                f.duplicates
            );
            for d in &f.duplicate_examples {
                let _ = write!(duplicates, "<li>{}</li>", escape(&duplicate_text(d)));
            }
            duplicates.push_str("</ul>");
        }
        format!(
            r#"<!doctype html><html><head><meta charset="utf-8"><title>peerbus chaos report</title>
<style>body{{font-family:sans-serif;margin:2em}}td,th{{padding:2px 10px;text-align:left}}.ok{{color:#1b5e20}}.fail{{color:#b71c1c}}</style></head><body>
<h1>peerbus chaos: <span class="{cls}">{verdict}</span></h1>
<p>accepted {acc} · delivered {del} · lost {lost} · undrained {undrained} · order violations {ord} · protocol faults {pf} · duplicates {dup} ({dupx} after a kill of the handler, {dups} of the sender) · peak log depth {peak}</p>
{svg}
<h2>Faults</h2><table><tr><th>#</th><th>kind</th><th>target</th><th>start s</th><th>end s</th><th>drain s</th><th>waited for last</th></tr>{rows}</table>
{mesh_ca}
{key_rotation}
{duplicates}
<h2>Settings</h2><pre>{settings}</pre></body></html>
"#,
            cls = if f.ok() { "ok" } else { "fail" },
            verdict = if f.ok() { "PASS" } else { "FAIL" },
            acc = f.accepted,
            del = f.delivered,
            lost = f.lost,
            undrained = f.undrained,
            ord = f.order_violations,
            pf = f.protocol_faults,
            dup = f.duplicates,
            dupx = f.duplicates_explained,
            dups = f.duplicates_after_sender_kill,
            peak = self.peak_backlog,
            settings = serde_json::to_string_pretty(&self.settings).unwrap_or_default(),
        )
    }
}

/// How a `--mesh-ca` run's revocation list spread, what it cut off and how its renewal was
/// taken, in words: the table's three rows, and the HTML page's.
fn mesh_ca_text(r: &MeshCaRun) -> [String; 3] {
    let node = r.revoked_node;
    let list = format!(
        "{} of {} nodes (node-{node}'s certificate revoked at {:.1} s; {})",
        r.nodes_holding,
        r.nodes_expected,
        r.revoked_at_s,
        match r.reached_all_after_s {
            Some(after) => format!("every other node held it {after:.2} s later"),
            None if r.nodes_holding == r.nodes_expected => {
                "all held it only once the faults were healed".to_string()
            }
            None => "not all held it".to_string(),
        }
    );
    let knew = match r.knew_after_s {
        Some(after) => format!("it said it was revoked {after:.2} s after the revocation"),
        None => "it did not say it was revoked before the renewal".to_string(),
    };
    let cut_off = match r.reached_all_after_s {
        Some(after) if r.revoked_at_s + after < r.renewed_at_s => format!(
            "{} of the {} messages node-{node} sent from {:.1} s to its renewal ({knew})",
            r.handled_while_cut_off,
            r.sent_while_cut_off,
            r.revoked_at_s + after
        ),
        Some(_) => format!(
            "not checked: the list reached every other node only after node-{node}'s renewal"
        ),
        None => {
            "not checked: the list did not reach every other node while the faults ran".to_string()
        }
    };
    let renewal = format!(
        "{} of {} nodes (renewed at {:.1} s; node-{node} {}{})",
        r.nodes_renewed,
        r.nodes,
        r.renewed_at_s,
        match r.readmitted_after_s {
            Some(after) => format!("connected again {after:.2} s later"),
            None => "not connected again before the workload ended".to_string(),
        },
        match r.nodes_still_revoked {
            0 => String::new(),
            n => format!("; {n} still said they were revoked"),
        }
    );
    [list, cut_off, renewal]
}

/// The message a fault's drain waited for last, in a line.
fn slowest_text(m: &SlowestDelivery) -> String {
    format!(
        "{} at {} on node-{}, {:.2} s after its acceptance",
        m.message,
        m.consumer,
        m.by,
        m.handled_us.saturating_sub(m.accepted_us) as f64 / 1e6
    )
}

/// A duplicate, its two handlings and its cause, in a line.
fn duplicate_text(d: &DuplicateExample) -> String {
    format!(
        "{} handled {} on node-{} at {:.2} s, again on node-{} at {:.2} s ({}{})",
        d.consumer,
        d.message,
        d.previous_by,
        d.previous_at_s,
        d.by,
        d.at_s,
        d.cause,
        d.fault
            .map_or_else(String::new, |n| format!(": fault #{n}"))
    )
}

/// `s` with the characters that mean something in HTML escaped.
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chaos::checker::MessageRef;

    fn fault(kind: &str, drain: Option<f64>) -> FaultView {
        FaultView {
            kind: kind.to_string(),
            target: "node-1".to_string(),
            start: 1.0,
            end: 2.0,
            drain_seconds: drain,
            slowest: None,
        }
    }

    /// The cut-off row counts what got through only when every other node held the list
    /// before the renewal, and says why not otherwise.
    #[test]
    fn the_cut_off_row_is_checked_only_when_the_list_came_before_the_renewal() {
        let run = |reached| MeshCaRun {
            revoked_node: 4,
            revoked_at_s: 30.0,
            reached_all_after_s: reached,
            sent_while_cut_off: 1046,
            handled_while_cut_off: 0,
            knew_after_s: Some(0.5),
            nodes_still_revoked: 0,
            nodes_holding: 5,
            nodes_expected: 5,
            renewed_at_s: 45.0,
            readmitted_after_s: Some(2.78),
            nodes_renewed: 5,
            nodes: 5,
        };
        let [list, cut_off, renewal] = mesh_ca_text(&run(Some(1.91)));
        assert!(
            list.contains("every other node held it 1.91 s later"),
            "{list}"
        );
        assert_eq!(
            cut_off,
            "0 of the 1046 messages node-4 sent from 31.9 s to its renewal (it said it was \
             revoked 0.50 s after the revocation)"
        );
        assert!(
            renewal.contains("node-4 connected again 2.78 s later"),
            "{renewal}"
        );
        let [_, late, _] = mesh_ca_text(&run(Some(16.0)));
        assert!(late.starts_with("not checked: the list reached every other node only after"));
        let [_, never, _] = mesh_ca_text(&run(None));
        assert!(
            never.starts_with("not checked: the list did not reach"),
            "{never}"
        );
    }

    /// The table and the page name each fault's slowest message and each duplicate, the
    /// page with what came from the journals escaped.
    #[test]
    fn the_table_and_the_page_name_the_slowest_message_and_the_duplicates() {
        let mut slow = fault("kill", Some(1.25));
        slow.slowest = Some(SlowestDelivery {
            message: MessageRef {
                origin: 2,
                seq: 41,
                destination: "svc-1".into(),
                key: "<k>".into(),
                key_seq: 5,
            },
            consumer: "svc:svc-1".into(),
            by: 3,
            accepted_us: 1_000_000,
            handled_us: 2_500_000,
        });
        let mut findings = Findings {
            duplicates: 1,
            ..Findings::default()
        };
        findings.duplicate_examples.push(DuplicateExample {
            consumer: "grp:svc-0".into(),
            message: MessageRef {
                origin: 1,
                seq: 7,
                destination: "chaos.events".into(),
                key: "k0".into(),
                key_seq: 3,
            },
            previous_by: 0,
            previous_at_us: 0,
            by: 4,
            at_us: 0,
            previous_at_s: 1.5,
            at_s: 2.75,
            cause: "kill of the handler",
            fault: Some(1),
        });
        let report = RunReport {
            settings: json!({}),
            findings,
            faults: vec![slow],
            samples: Vec::new(),
            peak_backlog: 0,
            peak_backlog_per_node: Vec::new(),
            final_drain_seconds: 0.0,
            dir: String::new(),
        };
        let slowest = "node-2's seq 41 to svc-1 key <k>#5 at svc:svc-1 on node-3, 1.50 s after its \
                       acceptance";
        let duplicate = "grp:svc-0 handled node-1's seq 7 to chaos.events key k0#3 on node-0 at \
                         1.50 s, again on node-4 at 2.75 s (kill of the handler: fault #1)";
        let table = report.table();
        assert!(table.contains(slowest), "{table}");
        assert!(
            table.contains(&format!("duplicate: {duplicate}")),
            "{table}"
        );
        let html = report.html();
        assert!(html.contains(&escape(slowest)), "{html}");
        assert!(html.contains("key &lt;k&gt;"), "{html}");
        assert!(html.contains(&escape(duplicate)), "{html}");
    }

    /// Drains are summed up by kind: how many faults, how many drained, their mean and
    /// longest drain; a fault after which the run never drained counts only as a fault.
    #[test]
    fn drains_are_summed_up_by_kind() {
        let by_kind = drain_by_kind(&[
            fault("kill", Some(0.5)),
            fault("freeze", Some(0.25)),
            fault("kill", Some(1.5)),
            fault("kill", None),
        ]);
        assert_eq!(by_kind.keys().collect::<Vec<_>>(), ["freeze", "kill"]);
        assert_eq!(
            by_kind["kill"],
            DrainSummary {
                faults: 3,
                drained: 2,
                mean_seconds: 1.0,
                max_seconds: 1.5,
            }
        );
        assert_eq!(by_kind["freeze"].mean_seconds, 0.25);
        assert_eq!(
            drain_by_kind(&[fault("partition", None)])["partition"],
            DrainSummary {
                faults: 1,
                drained: 0,
                mean_seconds: 0.0,
                max_seconds: 0.0,
            }
        );
    }
}
