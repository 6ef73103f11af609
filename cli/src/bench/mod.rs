//! `peerbus bench`: the benchmark suite, each case beside the baseline its target compares
//! with, measured in the same run on 127.0.0.1.
//!
//! Case names follow `kind/durability/size` or `kind/figure`. Baselines: raw quinn streaming
//! (`baseline/stream/<size>`: one connection, one stream, length-prefixed frames coalesced into
//! 64 KiB writes) for `Memory` sends and publishes; the `Memory` send of the same size for
//! `Fsync` sends; raw quinn ping-pong (`baseline/pingpong`) for request latency. Throughput
//! cases run `--runs` times and report medians. Each run of a send follows a run of its
//! baseline (raw stream, memory send, fsync send, in turn per size), and its ratio is the
//! median of the per-run ratios, so that the machine's drift weighs on both sides alike.
//! Figures, not assertions: the ratios are what to compare across machines. Every case is
//! bounded in count and time.

mod cases;
mod raw;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use peerbus::Durability;
use serde_json::{Value, json};

/// Time cap of the whole suite.
const SUITE_CAP: Duration = Duration::from_secs(30 * 60);
/// Buffered entries in the backlog case (the figure).
const BACKLOG_ENTRIES: usize = 100_000;
/// Requests held in flight for `idle/cpu/requests-in-flight` (10,000 with `--quick`).
const IDLE_REQUESTS: usize = 60_000;

/// `peerbus bench`.
#[derive(Debug, clap::Args)]
pub(crate) struct BenchArgs {
    /// Run every case briefly (about a minute in all), once: for CI.
    #[arg(long)]
    quick: bool,
    /// Runs of each throughput case; the median is reported (default 3, 1 with --quick).
    #[arg(long, value_name = "N")]
    runs: Option<usize>,
    /// Run only the cases of these kinds (comma-separated: send, batch, publish, request,
    /// ack, backlog, discovery, idle, memory; `request` and `ack` run together) or with these
    /// names or name prefixes up to a `/`
    /// (`send/memory/1KiB`, `send/fsync`); the raw baselines those cases compare with always run.
    #[arg(long, value_name = "KINDS", value_delimiter = ',')]
    only: Vec<String>,
    /// Also write the cases as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Measure every raw baseline before the sends instead of pairing each send run with a
    /// baseline run just before it; ratios are then of the medians. For `scripts/profile`,
    /// which samples one case's runs only.
    #[arg(long)]
    baselines_first: bool,
}

/// One line of the report.
struct Case {
    name: String,
    /// The figures, by name (`msgs_per_s`, `mb_per_s`, `p50_us`, `seconds`, …).
    figures: BTreeMap<&'static str, f64>,
    /// The figure compared with the baseline or target, by name.
    primary: &'static str,
    /// The baseline case's name and its figure.
    baseline: Option<(String, f64)>,
    /// How the target reads, and whether the figure meets it.
    target: Option<(String, bool)>,
    /// Which way a shown ratio rounds: towards missing its target, if it has one.
    rounding: Rounding,
    /// The median of per-run ratios, when each run was paired with a baseline run.
    paired_ratio: Option<f64>,
    /// The primary figure of each run of a throughput case, in run order.
    runs: Vec<f64>,
    /// Each run's ratio to the baseline run just before it, when the runs were paired.
    run_ratios: Vec<f64>,
}

impl Case {
    fn new(name: impl Into<String>, primary: &'static str, value: f64) -> Self {
        Self {
            name: name.into(),
            figures: BTreeMap::from([(primary, value)]),
            primary,
            baseline: None,
            target: None,
            rounding: Rounding::Nearest,
            paired_ratio: None,
            runs: Vec::new(),
            run_ratios: Vec::new(),
        }
    }

    /// Keeps the primary figure of each run (the case's value is their median).
    fn runs(mut self, values: &[f64]) -> Self {
        self.runs = values.to_vec();
        self
    }

    fn with(mut self, figure: &'static str, value: f64) -> Self {
        self.figures.insert(figure, value);
        self
    }

    fn value(&self) -> f64 {
        self.figures.get(self.primary).copied().unwrap_or(f64::NAN)
    }

    fn against(mut self, baseline: &Case) -> Self {
        self.baseline = Some((baseline.name.clone(), baseline.value()));
        self
    }

    /// The ratio to the baseline: the median of the per-run ratios when the runs were paired
    /// ([`Case::paired`]), else the ratio of the medians.
    fn ratio(&self) -> Option<f64> {
        self.paired_ratio
            .or_else(|| self.baseline.as_ref().map(|(_, b)| self.value() / b))
    }

    /// Pairs run `i` of this case with run `i` of its baseline, measured just before it: the
    /// ratio becomes the median of `values[i] / baselines[i]`. A drift of the machine's speed
    /// between the runs (this VM has slow phases lasting minutes) then weighs on each pair
    /// alike instead of on whichever side ran in the slow phase. With counts that differ the
    /// ratio stays that of the medians.
    fn paired(mut self, values: &[f64], baselines: &[f64]) -> Self {
        if !values.is_empty() && values.len() == baselines.len() {
            self.run_ratios = values.iter().zip(baselines).map(|(v, b)| v / b).collect();
            self.paired_ratio = Some(median(self.run_ratios.clone()));
        }
        self
    }

    /// Target on the ratio: at least `min`.
    fn ratio_at_least(mut self, min: f64) -> Self {
        let met = self.ratio().is_some_and(|r| r >= min);
        self.target = Some((format!("ratio >= {min}"), met));
        self.rounding = Rounding::Down;
        self
    }

    /// Target on the ratio: at most `max`.
    fn ratio_at_most(mut self, max: f64) -> Self {
        let met = self.ratio().is_some_and(|r| r <= max);
        self.target = Some((format!("ratio <= {max}"), met));
        self.rounding = Rounding::Up;
        self
    }

    /// Target on the figure itself: below `max` (in the figure's unit).
    fn below(mut self, max: f64, unit: &str) -> Self {
        let met = self.value() < max;
        self.target = Some((format!("< {max} {unit}"), met));
        self
    }

    fn json(&self) -> Value {
        let mut v = json!({ "name": self.name });
        for (k, x) in &self.figures {
            v[*k] = json!(round(*x));
        }
        v["baseline"] = json!(self.baseline.as_ref().map(|(n, _)| n));
        v["baseline_value"] = json!(self.baseline.as_ref().map(|(_, x)| round(*x)));
        v["ratio"] = json!(self.shown_ratio());
        v["target"] = json!(self.target.as_ref().map(|(t, _)| t));
        v["met"] = json!(self.target.as_ref().map(|(_, m)| m));
        if !self.runs.is_empty() {
            v["runs"] = json!(self.runs.iter().copied().map(round).collect::<Vec<_>>());
        }
        if !self.run_ratios.is_empty() {
            v["run_ratios"] = json!(
                self.run_ratios
                    .iter()
                    .map(|&r| self.shown(r))
                    .collect::<Vec<_>>()
            );
        }
        v
    }

    /// The ratio to three decimals, as the table and the JSON show it: see [`Case::shown`].
    fn shown_ratio(&self) -> Option<f64> {
        self.ratio().map(|r| self.shown(r))
    }

    /// A ratio of this case (the case's, or one run's) to three decimals, rounded towards
    /// missing the target, so a shown ratio never reads as the other side of its line
    /// (1.30014 against `ratio <= 1.3` shows 1.301, not a missed 1.300).
    fn shown(&self, ratio: f64) -> f64 {
        let r = ratio * 1000.0;
        (match self.rounding {
            Rounding::Nearest => r.round(),
            Rounding::Up => r.ceil(),
            Rounding::Down => r.floor(),
        }) / 1000.0
    }

    fn row(&self) -> String {
        let figure = match self.primary {
            "msgs_per_s" => format!(
                "{:>10.0} msg/s {:>7.1} MB/s{}{}",
                self.value(),
                self.figures.get("mb_per_s").copied().unwrap_or(0.0),
                self.figures
                    .get("cpu_us_per_msg")
                    .map_or(String::new(), |c| format!(" {c:>5.1} µs cpu")),
                self.figures
                    .get("wire_bytes_per_msg")
                    .map_or(String::new(), |w| format!(" {w:>6.0} B/msg"))
            ),
            "requests_per_s" => format!("{:>10.0} req/s", self.value()),
            "seconds" => format!("{:>10.3} s", self.value()),
            "mib" => format!("{:>10.1} MiB", self.value()),
            "bytes" => format!("{:>10.0} B", self.value()),
            "ms_cpu_per_s" => format!(
                "{:>10.2} ms cpu/s{}",
                self.value(),
                self.figures
                    .get("requests")
                    .map_or(String::new(), |n| format!(", {n:.0} requests in flight"))
            ),
            unit => format!("{:>10.0} µs ({unit})", self.value()),
        };
        let ratio = self
            .shown_ratio()
            .map_or(String::new(), |r| format!("{r:.3}"));
        let target = self.target.as_ref().map_or(String::new(), |(t, met)| {
            format!("{t}: {}", if *met { "met" } else { "MISSED" })
        });
        let baseline = self.baseline.as_ref().map_or("", |(n, _)| n.as_str());
        format!(
            "{:<32} {:<54} {:<22} {:>6}  {}",
            self.name, figure, baseline, ratio, target
        )
    }
}

/// How [`Case::shown`] rounds.
#[derive(Clone, Copy, Debug)]
enum Rounding {
    /// No target on the ratio.
    Nearest,
    /// A target of at most some ratio.
    Up,
    /// A target of at least some ratio.
    Down,
}

fn round(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// The middle value; with an even count, the mean of the two middle ones (NaN when empty).
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => f64::NAN,
        _ if n % 2 == 1 => v[n / 2],
        _ => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn percentile_us(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i].as_secs_f64() * 1e6
}

fn size_name(size: usize) -> String {
    if size >= 1024 {
        format!("{}KiB", size / 1024)
    } else {
        format!("{size}B")
    }
}

/// Prints a case as soon as it is measured and keeps it for the table and JSON.
struct Report {
    cases: Vec<Case>,
}

impl Report {
    fn add(&mut self, case: Case) -> usize {
        println!("{}", case.row());
        self.cases.push(case);
        self.cases.len() - 1
    }

    fn get(&self, i: usize) -> &Case {
        &self.cases[i]
    }
}

/// Machine and versions, stated with the figures.
fn machine() -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    let rustc = std::process::Command::new("rustc")
        .arg("--version")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".into());
    json!({
        "cpu": cpu,
        "cores": std::thread::available_parallelism().map_or(1, |n| n.get()),
        "os": std::env::consts::OS,
        "kernel": kernel,
        "peerbus": env!("CARGO_PKG_VERSION"),
        "rustc": rustc,
        "build": if cfg!(debug_assertions) { "debug" } else { "release" },
    })
}

/// `peerbus bench`.
pub(crate) async fn run(args: &BenchArgs) -> Result<()> {
    let info = machine();
    println!(
        "peerbus bench: {} cores ({}), kernel {}, peerbus {}, {}, {} build, 127.0.0.1",
        info["cores"],
        info["cpu"].as_str().unwrap_or("?"),
        info["kernel"].as_str().unwrap_or("?"),
        info["peerbus"].as_str().unwrap_or("?"),
        info["rustc"].as_str().unwrap_or("?"),
        info["build"].as_str().unwrap_or("?"),
    );
    if cfg!(debug_assertions) {
        println!(
            "note: a debug build; run `cargo run --release -p peerbus-cli -- bench` for real figures"
        );
    }
    println!(
        "{:<32} {:<54} {:<22} {:>6}  target",
        "case", "figure", "baseline", "ratio"
    );
    let mut report = Report { cases: Vec::new() };
    tokio::time::timeout(SUITE_CAP, suite(args, &mut report))
        .await
        .context("the suite exceeded its time cap")??;

    let missed: Vec<&str> = report
        .cases
        .iter()
        .filter(|c| matches!(c.target, Some((_, false))))
        .map(|c| c.name.as_str())
        .collect();
    let with_target = report.cases.iter().filter(|c| c.target.is_some()).count();
    println!(
        "targets met: {} of {with_target}{}",
        with_target - missed.len(),
        if missed.is_empty() {
            String::new()
        } else {
            format!(" (missed: {})", missed.join(", "))
        }
    );
    if let Some(path) = &args.json {
        let doc = json!({
            "machine": info,
            "quick": args.quick,
            "cases": report.cases.iter().map(Case::json).collect::<Vec<_>>(),
        });
        std::fs::write(path, serde_json::to_string_pretty(&doc)?)
            .with_context(|| format!("writing {}", path.display()))?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

async fn suite(args: &BenchArgs, report: &mut Report) -> Result<()> {
    // A kind is wanted when a selector names it or a case of it; a case when a selector is its
    // name or the start of it up to a `/` (a kind is one: `send` of `send/memory/64B`).
    let wanted = |kind: &str| args.only.is_empty() || args.only.iter().any(|k| within(k, kind));
    let wanted_case =
        |name: &str| args.only.is_empty() || args.only.iter().any(|k| within(name, k));
    let quick = args.quick;
    let runs = args.runs.unwrap_or(if quick { 1 } else { 3 }).max(1);
    let scale = if quick { 1 } else { 4 };
    let tmp = tempfile::tempdir().context("creating a scratch directory")?;

    // Per payload size: the raw stream, the in-memory send and the fsync'd send, one run of
    // each in turn, so that every run of a case is paired with the run of its baseline just
    // before it (see `Case::paired`); with `--baselines-first`, all baselines first instead.
    let sizes = [64usize, 1024, 16 * 1024];
    let mut index = Baselines::default();
    let mut plans: Vec<SizePlan> = sizes
        .iter()
        .map(|&size| {
            let fsync = wanted("send") && wanted_case(&send_name("fsync", size));
            // An fsync case compares with the memory send of its size: that one runs too.
            // So does the one-key send, at 1 KiB.
            let one_key = size == 1024 && wanted("send") && wanted_case(ONE_KEY_CASE);
            let memory =
                wanted("send") && (wanted_case(&send_name("memory", size)) || fsync || one_key);
            // Batches at 64 B and 1 KiB, where the per-call work weighs most.
            let batched = size <= 1024 && wanted("batch");
            let batch_fsync = batched && wanted_case(&batch_name("fsync", size));
            let batch_memory = batched && (wanted_case(&batch_name("memory", size)) || batch_fsync);
            SizePlan {
                size,
                // The baselines the memory sends and the publishes compare with.
                raw: memory || batch_memory || (size == 1024 && wanted("publish")),
                memory,
                fsync,
                batch_memory,
                batch_fsync,
                runs: SizeRuns::default(),
                paired: !args.baselines_first,
                reported: [false; 5],
            }
        })
        .collect();
    // Each group of steps runs `runs` times in turn; a case is reported as soon as its runs
    // are done.
    let groups: &[&[Step]] = if args.baselines_first {
        &[
            &[Step::Memory],
            &[Step::Fsync],
            &[Step::BatchMemory],
            &[Step::BatchFsync],
        ]
    } else {
        &[&[
            Step::Raw,
            Step::Memory,
            Step::Fsync,
            Step::BatchMemory,
            Step::BatchFsync,
        ]]
    };
    if args.baselines_first {
        for plan in &mut plans {
            for _ in 0..runs {
                plan.run(Step::Raw, scale, tmp.path()).await?;
            }
            plan.report_done(runs, report, &mut index);
        }
    }
    for plan in &mut plans {
        for steps in groups {
            for _ in 0..runs {
                for &step in *steps {
                    plan.run(step, scale, tmp.path()).await?;
                }
            }
            plan.report_done(runs, report, &mut index);
        }
    }

    // One key: every message in flight waits behind the earlier ones of its key.
    if wanted("send") && wanted_case(ONE_KEY_CASE) {
        let mut figures = Vec::with_capacity(runs);
        for _ in 0..runs {
            let messages = send_messages(1024, scale);
            let f = cases::send(Durability::Memory, 1024, messages, (1, 1), tmp.path());
            figures.push(f.await?);
        }
        let (case, _) = send_case(ONE_KEY_CASE.to_string(), 1024, &figures);
        report.add(match index.memory.get(&1024) {
            Some(&i) => case.against(report.get(i)),
            None => case,
        });
    }

    // Publish fan-out: as many copies per run as a 1 KiB send run has messages. With 20,000
    // publishes per run (5,000 × scale) whatever the groups, a run to one group lasted about
    // 0.1 s, and what a run pays once (the first calls, the last acks) took a quarter off
    // its rate: 150k and 172k msg/s (0.77 and 0.74 of the send in the same run) against
    // 237k and 196k (0.92 and 0.81) with four times the publishes.
    let fan_outs = [1usize, 3, 10].map(|groups| (groups, publish_name(groups)));
    for (groups, name) in fan_outs.iter().filter(|(_, name)| wanted_case(name)) {
        let mut figures = Vec::with_capacity(runs);
        let messages = send_messages(1024, scale).div_ceil(*groups);
        for _ in 0..runs {
            figures.push(cases::publish(*groups, 1024, messages).await?);
        }
        let (case, _) = send_case(name.clone(), 1024, &figures);
        report.add(case.against(report.get(index.stream[&1024])));
    }

    if wanted("request") || wanted("ack") {
        requests(report, scale, &tmp.path().join("acks")).await?;
    }
    if wanted("backlog") {
        let backlog = cases::backlog(BACKLOG_ENTRIES, 1024, &tmp.path().join("backlog")).await?;
        report.add(
            Case::new("backlog/fsync/1KiB/100k", "seconds", backlog.drain_seconds)
                .with("entries", BACKLOG_ENTRIES as f64)
                .below(2.0, "s"),
        );
        report.add(Case::new(
            "disk/bytes-per-entry/1KiB",
            "bytes",
            backlog.disk_bytes_per_entry,
        ));
    }
    if wanted("discovery") {
        // Over mDNS on the loopback interface.
        let secs = cases::discovery().await?;
        report.add(Case::new("discovery/first-message", "seconds", secs).below(1.0, "s"));
    }
    if wanted("idle") {
        let (requests, window) = if quick {
            (10_000, Duration::from_secs(1))
        } else {
            (IDLE_REQUESTS, Duration::from_secs(3))
        };
        let (none, with) = cases::idle_cpu(requests, window).await?;
        let base = report.add(Case::new("idle/cpu", "ms_cpu_per_s", none));
        report.add(
            Case::new("idle/cpu/requests-in-flight", "ms_cpu_per_s", with)
                .with("requests", requests as f64)
                .against(report.get(base)),
        );
    }
    if wanted("memory") {
        let rss = cases::idle_rss(&tmp.path().join("idle")).await?;
        report.add(
            Case::new("memory/idle-rss", "mib", rss as f64 / (1024.0 * 1024.0)).below(20.0, "MiB"),
        );
    }
    Ok(())
}

/// Whether the case (or kind) `name` is `path` or lies under it: `send/memory/1KiB` lies under
/// `send` and `send/memory`, but `publish/memory/1KiB/groups=10` not under `…/groups=1`.
fn within(name: &str, path: &str) -> bool {
    name.strip_prefix(path)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// 1 KiB sends that all have one key, against the sends of [`KEYS`] keys: the cost of a key
/// with many messages in flight.
const ONE_KEY_CASE: &str = "send/memory/1KiB/keys=1";

/// `publish/memory/1KiB/groups=<groups>`: 1 KiB publishes to `groups` subscriber groups.
fn publish_name(groups: usize) -> String {
    format!("publish/memory/1KiB/groups={groups}")
}

/// `send/<durability>/<size>`.
fn send_name(durability: &str, size: usize) -> String {
    format!("send/{durability}/{}", size_name(size))
}

/// `batch/<durability>/<size>`: sends of `size` bytes in `send_batch` calls of [`BATCH`].
fn batch_name(durability: &str, size: usize) -> String {
    format!("batch/{durability}/{}", size_name(size))
}

/// Messages of one run of a send or batch case of `size` bytes.
fn send_messages(size: usize, scale: usize) -> usize {
    let per_scale = match size {
        16_384 => 4_000,
        _ => 20_000,
    };
    per_scale * scale
}

/// Messages per `send_batch` call in the `batch/…` cases.
const BATCH: usize = 32;
/// Keys of the send and batch cases (message `i` has key `k{i % KEYS}`): 256, so that a key
/// rarely has more than one message in flight among the 64 callers' sends.
const KEYS: usize = 256;

/// The case `name` (a send or batch case of `size` bytes) of these runs (median rate, MB/s
/// and CPU time per message), and the runs' rates in run order.
fn send_case(name: String, size: usize, runs: &[cases::SendFigures]) -> (Case, Vec<f64>) {
    let rates = rates(runs);
    let rate = median(rates.clone());
    let case = Case::new(name, "msgs_per_s", rate)
        .runs(&rates)
        .with("mb_per_s", rate * size as f64 / 1e6)
        .with(
            "cpu_us_per_msg",
            median(runs.iter().map(|f| f.cpu_us_per_msg).collect()),
        )
        .with(
            "wire_bytes_per_msg",
            median(runs.iter().map(|f| f.wire_bytes_per_msg).collect()),
        )
        .with(
            "datagrams_per_msg",
            median(runs.iter().map(|f| f.datagrams_per_msg).collect()),
        );
    (case, rates)
}

/// The messages/s of each run.
fn rates(runs: &[cases::SendFigures]) -> Vec<f64> {
    runs.iter().map(|f| f.msgs_per_s).collect()
}

/// [`send_case`] of durable sends, with their fsyncs per message, the entries the sender's
/// checkpoints wrote to the database and carried over to the next side-log file per message,
/// and the share of the runs' time those checkpoints took (commits wait meanwhile).
fn fsync_case(name: String, size: usize, runs: &[cases::SendFigures]) -> (Case, Vec<f64>) {
    let fsyncs: u64 = runs.iter().map(|f| f.fsyncs).sum();
    let checkpointed: u64 = runs.iter().map(|f| f.checkpointed_entries).sum();
    let carried: u64 = runs.iter().map(|f| f.carried_entries).sum();
    let checkpoint_secs: f64 = runs.iter().map(|f| f.checkpoint_time.as_secs_f64()).sum();
    let run_secs: f64 = runs
        .iter()
        .map(|f| f.messages as f64 / f.msgs_per_s.max(f64::MIN_POSITIVE))
        .sum();
    let messages = runs.iter().map(|f| f.messages).sum::<usize>().max(1) as f64;
    let (case, rates) = send_case(name, size, runs);
    let case = case
        .with("fsyncs_per_message", fsyncs as f64 / messages)
        .with(
            "checkpointed_entries_per_message",
            checkpointed as f64 / messages,
        )
        .with("carried_entries_per_message", carried as f64 / messages)
        .with(
            "checkpoint_share",
            checkpoint_secs / run_secs.max(f64::MIN_POSITIVE),
        );
    (case, rates)
}

/// Where in the report, per payload size, the cases that others compare with are.
#[derive(Default)]
struct Baselines {
    /// `baseline/stream/<size>`.
    stream: BTreeMap<usize, usize>,
    /// `send/memory/<size>`.
    memory: BTreeMap<usize, usize>,
    /// `batch/memory/<size>`.
    batch_memory: BTreeMap<usize, usize>,
}

/// One measurement of a [`SizePlan`].
#[derive(Clone, Copy)]
enum Step {
    Raw,
    Memory,
    Fsync,
    BatchMemory,
    BatchFsync,
}

/// What runs for one payload size, and what its runs measured so far.
struct SizePlan {
    size: usize,
    raw: bool,
    memory: bool,
    fsync: bool,
    batch_memory: bool,
    batch_fsync: bool,
    runs: SizeRuns,
    /// Whether each run of a case followed a run of its baseline (see [`Case::paired`]).
    paired: bool,
    /// Which of raw, memory, fsync, batch memory and batch fsync were reported.
    reported: [bool; 5],
}

/// The figures of each run, in run order.
#[derive(Default)]
struct SizeRuns {
    raw: Vec<f64>,
    raw_cpu: Vec<f64>,
    raw_wire: Vec<f64>,
    raw_datagrams: Vec<f64>,
    memory: Vec<cases::SendFigures>,
    fsync: Vec<cases::SendFigures>,
    batch_memory: Vec<cases::SendFigures>,
    batch_fsync: Vec<cases::SendFigures>,
}

impl SizePlan {
    /// Runs `step` once when it is planned (else does nothing) and keeps its figures.
    async fn run(&mut self, step: Step, scale: usize, scratch: &std::path::Path) -> Result<()> {
        let size = self.size;
        let messages = send_messages(size, scale);
        match step {
            Step::Raw if self.raw => {
                let frames = match size {
                    64 => 400_000,
                    1024 => 100_000,
                    _ => 10_000,
                } * scale;
                let cpu0 = cases::cpu_time();
                let figures = raw::stream(size, frames).await?;
                let cpu = cases::cpu_time().saturating_sub(cpu0);
                self.runs.raw.push(figures.msgs_per_s);
                self.runs.raw_wire.push(figures.wire_bytes_per_msg);
                self.runs.raw_datagrams.push(figures.datagrams_per_msg);
                self.runs
                    .raw_cpu
                    .push(cpu.as_secs_f64() * 1e6 / frames as f64);
            }
            Step::Memory if self.memory => {
                let f = cases::send(Durability::Memory, size, messages, (1, KEYS), scratch).await?;
                self.runs.memory.push(f);
            }
            Step::Fsync if self.fsync => {
                let dir = scratch.join(format!("send-fsync-{size}-{}", self.runs.fsync.len()));
                let f = cases::send(Durability::Fsync, size, messages, (1, KEYS), &dir).await?;
                self.runs.fsync.push(f);
            }
            Step::BatchMemory if self.batch_memory => {
                let f =
                    cases::send(Durability::Memory, size, messages, (BATCH, KEYS), scratch).await?;
                self.runs.batch_memory.push(f);
            }
            Step::BatchFsync if self.batch_fsync => {
                let n = self.runs.batch_fsync.len();
                let dir = scratch.join(format!("batch-fsync-{size}-{n}"));
                let f = cases::send(Durability::Fsync, size, messages, (BATCH, KEYS), &dir).await?;
                self.runs.batch_fsync.push(f);
            }
            _ => {}
        }
        Ok(())
    }

    /// Reports each planned case whose `runs` runs are done and that was not reported yet,
    /// keeping the report indices of the cases others compare with in `index`.
    fn report_done(&mut self, runs: usize, report: &mut Report, index: &mut Baselines) {
        let Baselines {
            stream,
            memory,
            batch_memory,
        } = index;
        let (size, r) = (self.size, &self.runs);
        if self.raw && !self.reported[0] && r.raw.len() == runs {
            self.reported[0] = true;
            let rate = median(r.raw.clone());
            let case = Case::new(
                format!("baseline/stream/{}", size_name(size)),
                "msgs_per_s",
                rate,
            )
            .runs(&r.raw)
            .with("mb_per_s", rate * size as f64 / 1e6)
            .with("cpu_us_per_msg", median(r.raw_cpu.clone()))
            .with("wire_bytes_per_msg", median(r.raw_wire.clone()))
            .with("datagrams_per_msg", median(r.raw_datagrams.clone()));
            stream.insert(size, report.add(case));
        }
        let paired = self.paired;
        // What a send case compares with: the case at `baseline`, run by run with
        // `baseline_runs` when the runs alternated.
        let against = |report: &Report,
                       (case, rates): (Case, Vec<f64>),
                       baseline: Option<&usize>,
                       baseline_runs: &[f64]| match baseline {
            Some(&i) if paired => case.against(report.get(i)).paired(&rates, baseline_runs),
            Some(&i) => case.against(report.get(i)),
            None => case,
        };
        if self.memory && !self.reported[1] && r.memory.len() == runs {
            self.reported[1] = true;
            let case = send_case(send_name("memory", size), size, &r.memory);
            let case = against(report, case, stream.get(&size), &r.raw);
            let case = match size {
                64 => case.ratio_at_least(0.35),
                1024 => case.ratio_at_least(0.8),
                _ => case,
            };
            memory.insert(size, report.add(case));
        }
        if self.fsync && !self.reported[2] && r.fsync.len() == runs {
            self.reported[2] = true;
            let case = fsync_case(send_name("fsync", size), size, &r.fsync);
            let case = against(report, case, memory.get(&size), &rates(&r.memory));
            report.add(if size == 1024 {
                case.ratio_at_least(0.5)
            } else {
                case
            });
        }
        // Batches have no target of their own: they show what the per-call work costs.
        if self.batch_memory && !self.reported[3] && r.batch_memory.len() == runs {
            self.reported[3] = true;
            let case = send_case(batch_name("memory", size), size, &r.batch_memory);
            let case = against(report, case, stream.get(&size), &r.raw);
            batch_memory.insert(size, report.add(case));
        }
        if self.batch_fsync && !self.reported[4] && r.batch_fsync.len() == runs {
            self.reported[4] = true;
            let case = fsync_case(batch_name("fsync", size), size, &r.batch_fsync);
            let case = against(
                report,
                case,
                batch_memory.get(&size),
                &rates(&r.batch_memory),
            );
            report.add(case);
        }
    }
}

/// CPU time the handler of `request/throughput/busy-handler` spends on each request.
const HANDLER_WORK: Duration = Duration::from_micros(20);

/// Round trips per block of [`requests`]' interleaved measurement.
const LATENCY_BLOCK: usize = 100;

/// Request/reply latency percentiles against raw ping-pong, and requests/s.
///
/// The two latencies are taken in alternating blocks of [`LATENCY_BLOCK`] round trips, with
/// both meshes up the whole time, so a change in the machine's speed during the run (other
/// work, a VM's drift) weighs on both alike instead of on whichever ran in the slow phase.
///
/// Each is measured from two places, in alternating blocks too: from the runtime's
/// `block_on` (as in a `#[tokio::main]` function; the cases `baseline/pingpong` and
/// `request/…`) and from a task spawned on the runtime (as in a service's handler;
/// `…/in-task`). The ratio differs between the two: from `block_on` the raw ping-pong takes
/// about twice as long as from a task, a request only a fifth longer (probably the wake-ups
/// of the thread outside the workers, at each end of every round trip, which a request
/// partly overlaps with its own hops between tasks; not traced).
async fn requests(report: &mut Report, scale: usize, dir: &std::path::Path) -> Result<()> {
    let rounds = 2_000 * scale;
    let mut pingpong = raw::PingPong::start().await?;
    pingpong.rounds(rounds.min(500)).await?;
    let mut echo = cases::Echo::start(rounds.min(500), Duration::ZERO, Some(dir)).await?;
    let (mut main, mut in_task) = (Latencies::default(), Latencies::default());
    let mut durable_acks = Vec::with_capacity(rounds);
    let fsyncs0 = echo.durable_fsyncs();
    while main.requests.len() < rounds {
        let n = LATENCY_BLOCK.min(rounds - main.requests.len());
        main.pingpong.extend(pingpong.rounds(n).await?);
        main.requests.extend(echo.rounds(n).await?);
        main.acks.extend(echo.acks(n).await?);
        durable_acks.extend(echo.durable_acks(n).await?);
        let (pp, lat, acks);
        (pingpong, echo, pp, lat, acks) = tokio::spawn(async move {
            let pp = pingpong.rounds(n).await?;
            let lat = echo.rounds(n).await?;
            let acks = echo.acks(n).await?;
            anyhow::Ok((pingpong, echo, pp, lat, acks))
        })
        .await
        .context("latency task")??;
        in_task.pingpong.extend(pp);
        in_task.requests.extend(lat);
        in_task.acks.extend(acks);
    }
    let fsyncs = echo.durable_fsyncs().saturating_sub(fsyncs0);
    let raw_rps = pingpong.throughput(cases::CALLERS, rounds * 4).await?;
    drop(pingpong);
    let rps = echo.throughput(rounds * 4).await?;
    echo.shutdown().await;
    let ack_case = main.report(report, "");
    in_task.report(report, "/in-task");
    // A durable send until its ack, against the in-memory one: what the fsync adds. Its
    // sender's fsyncs per message show what its store writer synced besides the entry.
    durable_acks.sort();
    let fsyncs_per_message = fsyncs as f64 / durable_acks.len().max(1) as f64;
    for (figure, primary, p) in PERCENTILES {
        let case = Case::new(
            format!("ack/fsync/{figure}"),
            primary,
            percentile_us(&durable_acks, p),
        );
        report.add(match figure {
            "p50" => case
                .against(report.get(ack_case))
                .with("fsyncs_per_message", fsyncs_per_message),
            _ => case,
        });
    }
    let base = report.add(Case::new(
        "baseline/pingpong/throughput",
        "requests_per_s",
        raw_rps,
    ));
    report.add(
        Case::new("request/throughput", "requests_per_s", rps)
            .with("callers", cases::CALLERS as f64)
            .against(report.get(base)),
    );
    // A handler that computes for HANDLER_WORK before it answers: its requests can use every
    // core only if the server runs several handlers at once.
    let busy = cases::Echo::start(100, HANDLER_WORK, None).await?;
    let busy_rps = busy.throughput(rounds * 2).await?;
    busy.shutdown().await;
    report.add(
        Case::new(
            "request/throughput/busy-handler",
            "requests_per_s",
            busy_rps,
        )
        .with("callers", cases::CALLERS as f64)
        .with("handler_us", HANDLER_WORK.as_micros() as f64),
    );
    Ok(())
}

/// Round-trip times of the raw ping-pong and of requests, from one calling context.
#[derive(Default)]
struct Latencies {
    pingpong: Vec<Duration>,
    requests: Vec<Duration>,
    /// Sends, each until its receipt says it was acknowledged (`Echo::acks`).
    acks: Vec<Duration>,
}

impl Latencies {
    /// Adds `baseline/pingpong<context>`, `request<context>/p50`, `/p99` and `/p99.9`, each
    /// against the ping-pong's same percentile (the p50 carries the target), and the same
    /// percentiles of a send until its acknowledgement, `ack<context>/…` (no target).
    /// Returns the index of `ack<context>/p50`.
    fn report(mut self, report: &mut Report, context: &str) -> usize {
        self.pingpong.sort();
        self.requests.sort();
        self.acks.sort();
        let [pp50, pp99, pp999] = [0.5, 0.99, 0.999].map(|p| percentile_us(&self.pingpong, p));
        let base = format!("baseline/pingpong{context}");
        let pp_case = report.add(
            Case::new(base.clone(), "p50_us", pp50)
                .with("p99_us", pp99)
                .with("p999_us", pp999),
        );
        // Requests carry the target (at their p50); acks are shown beside them, without one.
        let mut ack_p50 = 0;
        for (kind, samples, target) in [
            ("request", &self.requests, Some(1.3)),
            ("ack", &self.acks, None),
        ] {
            for (figure, primary, p) in PERCENTILES {
                let case = Case::new(
                    format!("{kind}{context}/{figure}"),
                    primary,
                    percentile_us(samples, p),
                );
                let case = match (figure, target) {
                    ("p50", Some(most)) => case.against(report.get(pp_case)).ratio_at_most(most),
                    ("p50", None) => case.against(report.get(pp_case)),
                    _ => case.against(&Case::new(
                        format!("{base}/{figure}"),
                        primary,
                        percentile_us(&self.pingpong, p),
                    )),
                };
                let i = report.add(case);
                if kind == "ack" && figure == "p50" {
                    ack_p50 = i;
                }
            }
        }
        ack_p50
    }
}

/// The latency percentiles reported: name, JSON figure and quantile.
const PERCENTILES: [(&str, &str, f64); 3] = [
    ("p50", "p50_us", 0.5),
    ("p99", "p99_us", 0.99),
    ("p99.9", "p999_us", 0.999),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_median_of_an_even_count_is_the_mean_of_the_middle_two() {
        assert_eq!(median(vec![4.0, 1.0, 3.0]), 3.0);
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(median(vec![7.0]), 7.0);
        assert!(median(Vec::new()).is_nan());
    }

    #[test]
    fn selectors_match_whole_name_steps() {
        assert!(within("send/memory/1KiB", "send"));
        assert!(within("send/memory/1KiB", "send/memory"));
        assert!(within("send/memory/1KiB", "send/memory/1KiB"));
        assert!(!within("send/memory/16KiB", "send/memory/1KiB"));
        assert!(!within(
            "publish/memory/1KiB/groups=10",
            "publish/memory/1KiB/groups=1"
        ));
        assert!(within(
            "publish/memory/1KiB/groups=1",
            "publish/memory/1KiB/groups=1"
        ));
        assert!(!within("sender", "send"));
    }

    #[test]
    fn the_json_keeps_each_run_and_each_paired_ratio() {
        let baseline = Case::new("baseline/stream/1KiB", "msgs_per_s", 400.0);
        let case = Case::new("send/memory/1KiB", "msgs_per_s", 200.0)
            .runs(&[100.0, 200.0, 300.0])
            .against(&baseline)
            .paired(&[100.0, 200.0, 300.0], &[400.0, 400.0, 500.0]);
        let v = case.json();
        assert_eq!(v["runs"], json!([100.0, 200.0, 300.0]));
        assert_eq!(v["run_ratios"], json!([0.25, 0.5, 0.6]));
        assert_eq!(v["ratio"], json!(0.5));
        let single = Case::new("memory/idle-rss", "mib", 14.0).json();
        assert!(single.get("runs").is_none() && single.get("run_ratios").is_none());
    }

    #[test]
    fn a_paired_ratio_is_the_median_of_the_per_run_ratios() {
        let baseline = Case::new("baseline/stream/1KiB", "msgs_per_s", 300.0);
        // The machine slowed down after the first run and sped up during the last one: the
        // medians alone (300 / 300) would say 1.0, where two of the three pairs say 0.5.
        let case = Case::new("send/memory/1KiB", "msgs_per_s", 300.0)
            .against(&baseline)
            .paired(&[300.0, 150.0, 300.0], &[600.0, 300.0, 300.0])
            .ratio_at_least(0.8);
        assert_eq!(case.ratio(), Some(0.5));
        assert!(matches!(case.target, Some((_, false))));
        let rates = [100.0, 600.0];
        let unpaired = Case::new("send/memory/1KiB", "msgs_per_s", 150.0)
            .against(&baseline)
            .paired(&rates, &[400.0]);
        assert_eq!(
            unpaired.ratio(),
            Some(0.5),
            "counts differ: ratio of the medians"
        );
        let pairs = Case::new("x", "msgs_per_s", 1.0)
            .against(&baseline)
            .paired(&[1.0, 3.0, 2.0], &[4.0, 4.0, 4.0]);
        assert_eq!(pairs.ratio(), Some(0.5));
    }

    #[test]
    fn each_calling_context_reports_its_latencies_against_its_own_ping_pong() {
        let us = |v: &[u64]| v.iter().map(|&u| Duration::from_micros(u)).collect();
        let mut report = Report { cases: Vec::new() };
        let main = Latencies {
            pingpong: us(&[60, 70, 80]),
            requests: us(&[90, 80, 100]),
            acks: us(&[140, 120, 130]),
        };
        let in_task = Latencies {
            pingpong: us(&[30, 20, 40]),
            requests: us(&[60, 70, 80]),
            acks: us(&[100, 90, 110]),
        };
        main.report(&mut report, "");
        in_task.report(&mut report, "/in-task");
        let find = |name: &str| {
            report
                .cases
                .iter()
                .find(|c| c.name == name)
                .unwrap_or_else(|| panic!("no case {name}"))
        };
        let p50 = find("request/p50");
        assert_eq!(p50.value(), 90.0);
        assert_eq!(p50.ratio().map(round), Some(round(90.0 / 70.0)));
        assert!(matches!(p50.target, Some((_, true))), "1.29 is within 1.3");
        let task = find("request/in-task/p50");
        assert_eq!(task.value(), 70.0);
        assert_eq!(task.ratio(), Some(70.0 / 30.0));
        assert!(matches!(task.target, Some((_, false))), "2.33 is not");
        assert_eq!(find("baseline/pingpong/in-task").value(), 30.0);
        let p99 = find("request/in-task/p99").json();
        assert_eq!(p99["baseline"], json!("baseline/pingpong/in-task/p99"));
        let ack = find("ack/p50");
        assert_eq!(ack.value(), 130.0);
        assert_eq!(ack.ratio(), Some(130.0 / 70.0));
        assert!(ack.target.is_none(), "acks have no target");
        let ack = find("ack/in-task/p50");
        assert_eq!(ack.value(), 100.0);
        assert_eq!(ack.ratio(), Some(100.0 / 30.0));
        let ack99 = find("ack/in-task/p99").json();
        assert_eq!(ack99["baseline"], json!("baseline/pingpong/in-task/p99"));
    }

    /// A ratio just past its line is shown past it, in the table and the JSON, and one just
    /// inside it inside: rounded to the nearest it read 1.300 (or 0.500) and "MISSED".
    #[test]
    fn a_shown_ratio_reads_on_the_side_of_its_line_that_its_verdict_says() {
        // (figure, baseline, target) -> (verdict, the JSON's ratio)
        let judged = |value: f64, base: f64, target: fn(Case) -> Case| {
            let base = Case::new("base", "p50_us", base);
            let case = target(Case::new("case", "p50_us", value).against(&base));
            let met = case.target.as_ref().map(|(_, met)| *met);
            (met, case.json()["ratio"].clone(), case.row())
        };
        let at_most = |c: Case| c.ratio_at_most(1.3);
        let at_least = |c: Case| c.ratio_at_least(0.5);
        let (met, ratio, row) = judged(38.046, 29.263, at_most);
        assert_eq!((met, ratio), (Some(false), json!(1.301)));
        assert!(row.contains(" 1.301  ratio <= 1.3: MISSED"), "{row}");
        let (met, ratio, _) = judged(38.04, 29.263, at_most);
        assert_eq!((met, ratio), (Some(true), json!(1.3)));
        let (met, ratio, _) = judged(49_996.0, 100_000.0, at_least);
        assert_eq!((met, ratio), (Some(false), json!(0.499)));
        let (met, ratio, _) = judged(50_004.0, 100_000.0, at_least);
        assert_eq!((met, ratio), (Some(true), json!(0.5)));
        // Without a target the ratio rounds to the nearest.
        let (met, ratio, _) = judged(49_996.0, 100_000.0, |c| c);
        assert_eq!((met, ratio), (None, json!(0.5)));
    }
}
