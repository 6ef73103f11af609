//! `peerbus chaos --rotate-key`: a rotation of the mesh key in place, under the faults, as an
//! operator runs one (README: "Rotating the mesh key").
//!
//! Every node reads the run's one key file (`mesh.key`). The run writes the rotation's three
//! steps into it in turn and asks each node to read it again through its control socket
//! (`{"cmd":"reload"}`, what `peerbus reload` sends), retrying a node that does not answer
//! (killed, frozen) until it does; a killed node reads the file when it starts again. A step
//! is written only once every node took the one before it, so no two nodes are ever two
//! steps apart: a node refused for its key is a protocol fault of the run (`mesh_proof_failed`).
//! The last step makes each node close the connections whose peer proved the old key, and
//! those peers dial again with the new one. At the end every node must prove and accept the
//! new key alone, and node-0, restarted on it, must be admitted by every other.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use peerbus::FileOutcome;
use serde::Serialize;
use serde_json::json;

use super::control;

/// What each step makes every node do, by step (1–3).
pub(crate) const STEPS: [&str; 3] = [
    "prove the old key, accept the new one",
    "prove the new key, accept the old one",
    "the new key alone",
];

/// How often a node that has not taken a step yet is asked again.
const ASK_EVERY: Duration = Duration::from_millis(250);

/// The run's key file and the two keys of its rotation, each as its line of hex.
pub(crate) struct Rotation {
    key_file: PathBuf,
    old: String,
    new: String,
}

impl Rotation {
    /// Takes the key file's first key as the old key (the file keeps it alone, so a run
    /// directory used again starts from one key) and makes a new one, `next.key` beside it
    /// (as `peerbus keygen --out next.key` does).
    pub(crate) fn prepare(key_file: &Path) -> anyhow::Result<Self> {
        let next = key_file.with_file_name("next.key");
        // A run directory used again: the last run's next key is this run's old one.
        let _ = std::fs::remove_file(&next);
        peerbus::MeshKey::write_new(&next).context("making the rotation's new key")?;
        let rotation = Self {
            key_file: key_file.to_path_buf(),
            old: first_key(key_file)?,
            new: first_key(&next)?,
        };
        rotation.write_lines(&[&rotation.old])?;
        Ok(rotation)
    }

    /// Writes step `step` (1–3) into the key file.
    fn write(&self, step: usize) -> anyhow::Result<()> {
        match step {
            1 => self.write_lines(&[&self.old, &self.new]),
            2 => self.write_lines(&[&self.new, &self.old]),
            _ => self.write_lines(&[&self.new]),
        }
    }

    /// Replaces the key file (mode 0600, through a file beside it renamed over it, so a node
    /// never reads half of it).
    fn write_lines(&self, keys: &[&str]) -> anyhow::Result<()> {
        let mut tmp = self.key_file.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("writing {}", tmp.display()))?;
        f.write_all(format!("{}\n", keys.join("\n")).as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, &self.key_file)
            .with_context(|| format!("replacing {}", self.key_file.display()))
    }
}

/// The first key line of a key file, as it is written there.
fn first_key(path: &Path) -> anyhow::Result<String> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    match text
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'))
    {
        Some(key) => Ok(key.to_string()),
        None => bail!("{} holds no key", path.display()),
    }
}

/// One step of the rotation.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct StepRun {
    /// 1, 2 or 3 (see [`STEPS`]).
    pub(crate) step: usize,
    /// Seconds into the run when the key file was written.
    pub(crate) written_at_s: f64,
    /// Seconds after that until every node had taken it (answered a reload with `taken` or
    /// `unchanged`); `None` when not every node did before the wait ended.
    pub(crate) all_took_after_s: Option<f64>,
    /// Whether it was written while the workload and the faults ran (else after the faults
    /// were healed, the steps before it having taken that long).
    pub(crate) under_faults: bool,
    /// Why nodes refused the file, `node-i: why` (must be empty).
    pub(crate) refusals: Vec<String>,
}

/// How a `--rotate-key` run's rotation went.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct KeyRotationRun {
    /// The steps written, in order.
    pub(crate) steps: Vec<StepRun>,
    /// Nodes that, at the end of the run, answered that they hold the key file's keys (the
    /// new key alone) already.
    pub(crate) nodes_on_new_key: usize,
    /// Nodes in the run.
    pub(crate) nodes: usize,
    /// Seconds a node restarted at the end, on the new key alone, took to connect to every
    /// other node again (its peers must prove the new key and accept it on new
    /// connections); `None` when it did not within the wait.
    pub(crate) rejoined_after_s: Option<f64>,
}

impl KeyRotationRun {
    /// Whether every node took all three steps, refused none, and ends on the new key alone.
    pub(crate) fn ok(&self) -> bool {
        self.steps.len() == STEPS.len()
            && self
                .steps
                .iter()
                .all(|s| s.all_took_after_s.is_some() && s.refusals.is_empty())
            && self.nodes_on_new_key == self.nodes
            && self.rejoined_after_s.is_some()
    }

    /// The run's rotation in words, for the table and the HTML page: how many nodes end on
    /// the new key, whether the restarted node rejoined, then each step (`step 1 at 4.0 s,
    /// all took it in 0.25 s; …`).
    pub(crate) fn text(&self) -> String {
        let steps: Vec<String> = self
            .steps
            .iter()
            .map(|s| {
                let took = match s.all_took_after_s {
                    Some(after) => format!("all took it in {after:.2} s"),
                    None => "not all took it".to_string(),
                };
                let when = if s.under_faults {
                    format!("at {:.1} s", s.written_at_s)
                } else {
                    "after the heal".to_string()
                };
                let refused = if s.refusals.is_empty() {
                    String::new()
                } else {
                    format!(", {} refused", s.refusals.len())
                };
                format!("step {} {when}, {took}{refused}", s.step)
            })
            .collect();
        format!(
            "{} of {} nodes on the new key alone, a node restarted on it {} ({})",
            self.nodes_on_new_key,
            self.nodes,
            match self.rejoined_after_s {
                Some(after) => format!("rejoined every other in {after:.2} s"),
                None => "did not rejoin every other".to_string(),
            },
            if steps.is_empty() {
                "no step written".to_string()
            } else {
                steps.join("; ")
            }
        )
    }
}

/// What a node did with its key file when asked to read it again (the control socket's
/// `reload`, read as [`peerbus::MeshReload`]); `None` without an answer (down, frozen,
/// stopping) or with one that names no key file.
async fn reload(dir: &Path) -> Option<FileOutcome> {
    let mut v = control(dir, json!({"cmd": "reload"})).await?;
    serde_json::from_value::<peerbus::MeshReload>(v["reload"].take())
        .ok()?
        .key_file
}

/// Asks every node of `pending` at once to read its key file again; keeps in `pending` those
/// that did not answer that they hold it (with `already`, that they held it before they
/// were asked: `unchanged`), and adds each refusal to `refusals`.
async fn ask(
    dirs: &[PathBuf],
    pending: &mut Vec<usize>,
    refusals: &mut Vec<String>,
    already: bool,
) {
    let mut set = tokio::task::JoinSet::new();
    for &i in pending.iter() {
        let d = dirs[i].clone();
        set.spawn(async move { (i, reload(&d).await) });
    }
    let mut holding = Vec::new();
    while let Some(r) = set.join_next().await {
        match r {
            Ok((i, Some(FileOutcome::Unchanged))) => holding.push(i),
            Ok((i, Some(FileOutcome::Taken))) if !already => holding.push(i),
            Ok((i, Some(FileOutcome::Refused(why)))) => refusals.push(format!("node-{i}: {why}")),
            _ => {}
        }
    }
    pending.retain(|i| !holding.contains(i));
}

/// Takes the rotation's steps after those in `done`: step `s` is written at `at(s)` at the
/// earliest and once every node took the step before it, then every node is asked until it
/// took it or `until`. Returns when all three steps were taken by every node or `until`
/// passed. `under_faults` marks the steps this call writes.
pub(crate) async fn take_steps(
    rotation: &Rotation,
    dirs: &[PathBuf],
    t0: Instant,
    at: impl Fn(usize) -> Instant,
    until: Instant,
    under_faults: bool,
    done: &mut Vec<StepRun>,
) -> anyhow::Result<()> {
    // A step written but not taken by every node before: ask again.
    if let Some(last) = done.last_mut()
        && last.all_took_after_s.is_none()
    {
        let written = t0 + Duration::from_secs_f64(last.written_at_s);
        if !all_take(dirs, until, &mut last.refusals).await {
            return Ok(());
        }
        last.all_took_after_s = Some(written.elapsed().as_secs_f64());
        println!(
            "chaos: every node took key rotation step {} ({}) {:.2}s after it was written",
            last.step,
            STEPS[last.step - 1],
            written.elapsed().as_secs_f64()
        );
    }
    for step in done.len() + 1..=STEPS.len() {
        let when = at(step);
        if when >= until {
            return Ok(());
        }
        tokio::time::sleep_until(when.into()).await;
        rotation
            .write(step)
            .with_context(|| format!("writing key rotation step {step}"))?;
        let written = Instant::now();
        println!(
            "chaos: key rotation step {step} ({}) written at {:.1}s",
            STEPS[step - 1],
            (written - t0).as_secs_f64()
        );
        let mut run = StepRun {
            step,
            written_at_s: (written - t0).as_secs_f64(),
            all_took_after_s: None,
            under_faults,
            refusals: Vec::new(),
        };
        let took = all_take(dirs, until, &mut run.refusals).await;
        if took {
            let after = written.elapsed().as_secs_f64();
            run.all_took_after_s = Some(after);
            println!(
                "chaos: every node took key rotation step {step} {after:.2}s after it was written"
            );
        }
        done.push(run);
        if !took {
            return Ok(());
        }
    }
    Ok(())
}

/// Asks every node until each answered that it holds the key file as it is now (a node that
/// started since it was written read it then) or `until` passes; whether all did.
async fn all_take(dirs: &[PathBuf], until: Instant, refusals: &mut Vec<String>) -> bool {
    let mut pending: Vec<usize> = (0..dirs.len()).collect();
    loop {
        ask(dirs, &mut pending, refusals, false).await;
        if pending.is_empty() {
            return true;
        }
        if Instant::now() + ASK_EVERY >= until {
            return false;
        }
        tokio::time::sleep(ASK_EVERY).await;
    }
}

/// How many nodes answer, asked until `until`, that they held the key file's keys (the last
/// step's new key alone) before they were asked: a node that takes them only now, or
/// refuses them, does not count.
pub(crate) async fn nodes_on_file(dirs: &[PathBuf], until: Instant) -> usize {
    let mut pending: Vec<usize> = (0..dirs.len()).collect();
    let mut refusals = Vec::new();
    loop {
        ask(dirs, &mut pending, &mut refusals, true).await;
        if pending.is_empty() || Instant::now() + ASK_EVERY >= until {
            return dirs.len() - pending.len();
        }
        tokio::time::sleep(ASK_EVERY).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(step: usize, took: Option<f64>, refusals: &[&str]) -> StepRun {
        StepRun {
            step,
            written_at_s: step as f64,
            all_took_after_s: took,
            under_faults: true,
            refusals: refusals.iter().map(ToString::to_string).collect(),
        }
    }

    #[test]
    fn a_rotation_passes_only_when_every_node_took_every_step_and_ends_on_the_new_key() {
        let all = || {
            vec![
                step(1, Some(0.5), &[]),
                step(2, Some(0.7), &[]),
                step(3, Some(0.2), &[]),
            ]
        };
        let run = |steps, on_new| KeyRotationRun {
            steps,
            nodes_on_new_key: on_new,
            nodes: 4,
            rejoined_after_s: Some(0.3),
        };
        assert!(run(all(), 4).ok());
        let mut apart = run(all(), 4);
        apart.rejoined_after_s = None;
        assert!(!apart.ok(), "a node on the new key alone not readmitted");
        assert!(!run(all(), 3).ok(), "a node left on an older key");
        assert!(!run(all()[..2].to_vec(), 4).ok(), "a step never written");
        let mut late = all();
        late[1].all_took_after_s = None;
        assert!(!run(late, 4).ok(), "a step some node never took");
        let mut refused = all();
        refused[2].refusals.push("node-1: line 1: not hex".into());
        assert!(!run(refused, 4).ok(), "a refused file");
        assert_eq!(
            run(all(), 4).text(),
            "4 of 4 nodes on the new key alone, a node restarted on it rejoined every other \
             in 0.30 s (step 1 at 1.0 s, all took it in 0.50 s; \
             step 2 at 2.0 s, all took it in 0.70 s; step 3 at 3.0 s, all took it in 0.20 s)"
        );
    }

    #[test]
    fn each_step_writes_the_keys_in_the_order_the_readme_gives() -> anyhow::Result<()> {
        use peerbus::MeshKey;
        let dir = tempfile::tempdir()?;
        let file = dir.path().join("mesh.key");
        let old = MeshKey::write_new(&file)?;
        // A run directory used again mid-rotation: the file keeps its first key alone.
        let other = MeshKey::write_new(&dir.path().join("other.key"))?;
        let both = [first_key(&file)?, first_key(&dir.path().join("other.key"))?];
        std::fs::write(&file, format!("# kept\n{}\n{}\n", both[0], both[1]))?;
        assert_eq!(MeshKey::load_all(&file)?, vec![old.clone(), other]);
        let r = Rotation::prepare(&file)?;
        assert_eq!(MeshKey::load_all(&file)?, vec![old.clone()]);
        let new = MeshKey::load(&dir.path().join("next.key"))?;
        assert_ne!(old, new);
        let want = [
            vec![old.clone(), new.clone()],
            vec![new.clone(), old],
            vec![new],
        ];
        for (s, keys) in want.iter().enumerate() {
            r.write(s + 1)?;
            assert_eq!(&MeshKey::load_all(&file)?, keys, "step {}", s + 1);
        }
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(
            std::fs::metadata(&file)?.permissions().mode() & 0o777,
            0o600
        );
        Ok(())
    }
}
