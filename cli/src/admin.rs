//! `peerbus status`, `peerbus entries` and `peerbus dlq`: ask a running node through its control socket, or
//! read a stopped node's data directory.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, anyhow, bail};
use peerbus::{CloseCode, control};
use serde_json::{Value, json};

use crate::common::{CommonArgs, UsageError};
use crate::output::{for_services, print_line};

/// `peerbus status`.
#[derive(Debug, clap::Args)]
pub(crate) struct StatusArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// `peerbus reload`.
#[derive(Debug, clap::Args)]
pub(crate) struct ReloadArgs {
    /// Print JSON instead of lines.
    #[arg(long)]
    json: bool,
}

/// `peerbus entries`.
#[derive(Debug, clap::Args)]
pub(crate) struct EntriesArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// At most this many (a running node lists at most 10,000).
    #[arg(long, default_value_t = 100)]
    limit: usize,
}

/// `peerbus dlq`.
#[derive(Debug, clap::Args)]
pub(crate) struct DlqArgs {
    #[command(subcommand)]
    action: DlqAction,
}

#[derive(Debug, clap::Subcommand)]
enum DlqAction {
    /// List dead letters, oldest first.
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// At most this many.
        #[arg(long, default_value_t = 1000)]
        limit: usize,
    },
    /// Move every message waiting in a log to the dead letters, on a running node or a stopped
    /// node's --data-dir: for a service gone for good. Messages in flight stay; `replay` sends
    /// them again.
    Move {
        /// The log (`svc:<service>`, `grp:<group>`, as `peerbus status` lists them).
        #[arg(long)]
        log: String,
    },
    /// Send dead letters again to their original destination (needs the node running).
    Replay {
        /// Ids to replay (repeatable).
        #[arg(long = "id", value_name = "ID", required_unless_present = "all")]
        ids: Vec<u64>,
        /// Replay all of them.
        #[arg(long, conflicts_with = "ids")]
        all: bool,
    },
}

fn data_dir(common: &CommonArgs) -> Result<PathBuf> {
    common
        .data_dir
        .clone()
        .ok_or_else(|| UsageError("give the node's --data-dir (or PEERBUS_DATA_DIR)".into()).into())
}

/// Asks the running node, or `None` when no node answers on the socket.
async fn ask(dir: &Path, req: Value) -> Result<Option<Value>> {
    if !control::socket_path(dir).exists() {
        return Ok(None);
    }
    match control::request(dir, &req).await {
        Ok(answer) => {
            if answer.get("ok").and_then(Value::as_bool) == Some(true) {
                Ok(Some(answer))
            } else {
                let e = answer
                    .get("error")
                    .and_then(Value::as_str)
                    .unwrap_or("unknown error");
                bail!("the node answered: {e}")
            }
        }
        // A socket left by a node that was killed: nobody listens.
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Ok(None),
        Err(e) => Err(e).context("could not reach the node's control socket"),
    }
}

/// A line of `peerbus status` for one of the node's revocation lists (an item of
/// `/status`'s `mesh_ca_lists`) at `now` (seconds since the Unix epoch): its number, CA,
/// issue and next update times and count, and a warning once it is past its next update.
fn list_line(list: &Value, now: u64) -> String {
    let time = |secs: u64| {
        humantime::format_rfc3339_seconds(
            std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs),
        )
    };
    let next = list.get("next_update").and_then(Value::as_u64);
    format!(
        "  list {} of {}, issued {}{}: {} revoked{}",
        list.get("number")
            .and_then(Value::as_str)
            .unwrap_or("(unnumbered)"),
        list.get("ca").and_then(Value::as_str).unwrap_or("?"),
        time(list.get("issued").and_then(Value::as_u64).unwrap_or(0)),
        next.map_or_else(String::new, |t| format!(", next update {}", time(t))),
        list.get("revoked").and_then(Value::as_u64).unwrap_or(0),
        if next.is_some_and(|t| t <= now) {
            "; PAST ITS NEXT UPDATE: the CA may have revoked more since, give the mesh a \
             newer list"
        } else {
            ""
        }
    )
}

/// `peerbus reload`: the running node reads its mesh files (CA files, or its key file) now.
/// Fails when it refused one (after printing what it did with each), so a script that
/// renews, revokes or rotates notices.
pub(crate) async fn reload(common: &CommonArgs, args: &ReloadArgs) -> Result<()> {
    let dir = data_dir(common)?;
    let Some(answer) = ask(&dir, json!({"cmd": "reload"})).await? else {
        bail!(
            "no node runs in {} (a node reads its mesh files when it starts)",
            dir.display()
        );
    };
    let reload: peerbus::MeshReload =
        serde_json::from_value(answer.get("reload").cloned().unwrap_or(Value::Null))
            .context("the node's answer to `reload` is not what this peerbus understands")?;
    if args.json {
        print_line(&serde_json::to_string_pretty(&reload)?)?;
    } else {
        for (name, outcome) in reload.files() {
            print_line(&format!("{name}: {outcome}"))?;
        }
    }
    let refused = reload
        .files()
        .filter(|(_, o)| matches!(o, peerbus::FileOutcome::Refused(_)))
        .count();
    if refused > 0 {
        bail!("the node refused {refused} of its mesh files and keeps what it uses");
    }
    Ok(())
}

/// `peerbus status`.
pub(crate) async fn status(common: &CommonArgs, args: &StatusArgs) -> Result<()> {
    let dir = data_dir(common)?;
    let (running, status) = match ask(&dir, json!({"cmd": "status"})).await? {
        Some(answer) => (true, answer.get("status").cloned().unwrap_or(Value::Null)),
        None => {
            let offline = control::offline_status(&dir)
                .with_context(|| format!("reading the stopped node's data in {}", dir.display()))?;
            (false, serde_json::to_value(offline)?)
        }
    };
    if args.json {
        let mut v = status;
        if let Some(o) = v.as_object_mut() {
            o.insert("running".into(), json!(running));
        }
        return print_line(&serde_json::to_string_pretty(&v)?);
    }
    if running {
        let s = |k: &str| {
            status
                .get(k)
                .map(|v| v.to_string().trim_matches('"').to_string())
                .unwrap_or_default()
        };
        print_line(&format!(
            "node {} service {} mesh {} (running, {})",
            s("node_id"),
            s("service"),
            s("mesh"),
            s("listen")
        ))?;
        print_line(&format!(
            "sent {}  acked {}  received here {}  delivered here {}  redelivered {}  dead letters {}  \
             connections {}",
            s("sent"),
            s("acked"),
            s("received"),
            s("delivered"),
            s("redelivered"),
            s("dead_letters"),
            s("connections")
        ))?;
        // Closes that point at a misbehaving or mismatched peer (its log has the details);
        // refusals of a revoked certificate (`revoked_certificate`, no close code of its own)
        // and the closes for a dropped mesh key (`retired_mesh_key`) are counted on their own
        // lines below.
        let faults: Vec<String> = status
            .get("connections_closed")
            .and_then(Value::as_object)
            .into_iter()
            .flatten()
            .filter_map(|(code, n)| {
                let c = CloseCode::from_name(code)?;
                let n = n.as_u64()?;
                ((c.is_protocol_fault() || c == CloseCode::Unresponsive) && n > 0)
                    .then(|| format!("{code} {n}"))
            })
            .collect();
        if !faults.is_empty() {
            print_line(&format!(
                "connections closed for peer faults: {}",
                faults.join("  ")
            ))?;
        }
        if let Some((proved, also)) = strings(&status, "mesh_keys").split_first() {
            print_line(&format!(
                "mesh key {proved}{}",
                if also.is_empty() {
                    String::new()
                } else {
                    format!(
                        ", also accepting {} (a key rotation's step)",
                        also.join(", ")
                    )
                }
            ))?;
        }
        if let Some(secs) = status
            .get("mesh_certificate_expires")
            .and_then(Value::as_u64)
        {
            let until = std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs);
            let services = strings(&status, "mesh_certificate_services");
            print_line(&format!(
                "mesh certificate valid until {}{}",
                humantime::format_rfc3339_seconds(until),
                for_services(&services)
            ))?;
        }
        if let Some(why) = status
            .get("mesh_certificate_revoked")
            .and_then(Value::as_str)
        {
            print_line(&format!(
                "mesh certificate REVOKED: {why}; its peers refuse this node until it has a new \
                 one (`peerbus ca issue`; the node reads its --mesh-cert file again every minute, \
                 at once with `peerbus reload`)"
            ))?;
        }
        if let Some(n) = status.get("mesh_ca_revoked").and_then(Value::as_u64) {
            print_line(&format!(
                "mesh CA revocation lists: {}",
                match n {
                    1 => "1 certificate revoked".to_string(),
                    n => format!("{n} certificates revoked"),
                }
            ))?;
        }
        let lists = status.get("mesh_ca_lists").and_then(Value::as_array);
        let now = unix_now_ms() / 1000;
        for list in lists.into_iter().flatten() {
            print_line(&list_line(list, now))?;
        }
        if let Some(revoked) = status
            .get("mesh_ca_refused_revoked")
            .and_then(Value::as_u64)
            .filter(|n| *n > 0)
        {
            print_line(&format!(
                "  connections refused for a revoked certificate: {revoked}"
            ))?;
        }
        if let Some(retired) = status
            .get("connections_closed")
            .and_then(|c| c.get(peerbus_transport::CloseCounts::RETIRED_MESH_KEY))
            .and_then(Value::as_u64)
            .filter(|n| *n > 0)
        {
            print_line(&format!(
                "connections closed for a mesh key this node dropped: {retired} (their peers \
                 proved it; those that prove a key in use connected again)"
            ))?;
        }
    } else {
        print_line(&format!(
            "node in {} is not running (read from its data directory)",
            dir.display()
        ))?;
        print_line(&format!(
            "dead letters {}  corrupt records {}",
            status.get("dead_letters").unwrap_or(&json!(0)),
            status.get("corrupt_records").unwrap_or(&json!(0))
        ))?;
    }
    print_line(&format!(
        "{:<32} {:>9} {:>10} {:>12}",
        "DESTINATION", "WAITING", "IN FLIGHT", "OLDEST"
    ))?;
    let now = unix_now_ms();
    if let Some(logs) = status.get("logs").and_then(Value::as_object) {
        for (name, l) in logs {
            let n = |k: &str| l.get(k).and_then(Value::as_u64).unwrap_or(0);
            let age = l
                .get("oldest_created_ms")
                .and_then(Value::as_u64)
                .map_or("-".to_string(), |t| {
                    format!("{:.1}s", now.saturating_sub(t) as f64 / 1000.0)
                });
            print_line(&format!(
                "{name:<32} {:>9} {:>10} {age:>12}",
                n("waiting"),
                n("in_flight")
            ))?;
        }
    }
    if let Some(groups) = status.get("groups").and_then(Value::as_object)
        && !groups.is_empty()
    {
        print_line(&format!(
            "{:<32} {:>9} {:<9}  PATTERNS",
            "DURABLE GROUP", "VERSION", "STATE"
        ))?;
        for (name, g) in groups {
            let version = g.get("version").and_then(Value::as_u64).unwrap_or(0);
            let patterns: Vec<&str> = g
                .get("patterns")
                .and_then(Value::as_array)
                .map(|p| p.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            let (state, patterns) = if patterns.is_empty() {
                ("released", "-".to_string())
            } else {
                ("live", patterns.join(", "))
            };
            print_line(&format!("{name:<32} {version:>9} {state:<9}  {patterns}"))?;
        }
    }
    Ok(())
}

/// The strings of the array `field` of a status (none when it is missing or not one).
fn strings<'a>(status: &'a Value, field: &str) -> Vec<&'a str> {
    status
        .get(field)
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect()
}

/// Milliseconds since the Unix epoch (0 on a clock before it), for the ages of entries.
fn unix_now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// `peerbus entries`.
pub(crate) async fn entries(common: &CommonArgs, args: &EntriesArgs) -> Result<()> {
    let dir = data_dir(common)?;
    let req = json!({"cmd": "entries", "limit": args.limit});
    let list: Value = match ask(&dir, req).await? {
        Some(answer) => answer.get("entries").cloned().unwrap_or(json!([])),
        None => serde_json::to_value(
            control::offline_entries(&dir, args.limit)
                .with_context(|| format!("reading the stopped node's log in {}", dir.display()))?,
        )?,
    };
    if args.json {
        return print_line(&serde_json::to_string_pretty(&list)?);
    }
    let list = list.as_array().cloned().unwrap_or_default();
    print_line(&format!(
        "{:<24} {:>20} {:<16} {:<20} {:>8} {:>8}  PAYLOAD",
        "LOG", "SEQ", "KEY", "STATE", "ATTEMPTS", "AGE"
    ))?;
    let now = unix_now_ms();
    for e in &list {
        let s = |k: &str| e.get(k).and_then(Value::as_str).unwrap_or("-").to_string();
        let n = |k: &str| e.get(k).and_then(Value::as_u64);
        let state = match e.get("to").and_then(Value::as_str) {
            Some(to) => format!("{} {}", s("state"), to.get(..10).unwrap_or(to)),
            None => s("state"),
        };
        let age = n("created_at_ms").map_or("-".into(), |t| {
            format!("{:.1}s", now.saturating_sub(t) as f64 / 1000.0)
        });
        let payload = s("payload");
        let shown: String = payload.chars().take(40).collect();
        print_line(&format!(
            "{:<24} {:>20} {:<16} {state:<20} {:>8} {age:>8}  {shown}{}",
            s("log"),
            n("seq").unwrap_or(0),
            s("key"),
            n("attempts").map_or("-".into(), |a| a.to_string()),
            if shown.len() < payload.len() {
                "…"
            } else {
                ""
            }
        ))?;
    }
    print_line(&format!(
        "{} entr{}",
        list.len(),
        if list.len() == 1 { "y" } else { "ies" }
    ))
}

/// `peerbus dlq`.
pub(crate) async fn dlq(common: &CommonArgs, args: &DlqArgs) -> Result<()> {
    let dir = data_dir(common)?;
    match &args.action {
        DlqAction::List {
            json: as_json,
            limit,
        } => {
            let letters: Value = match ask(&dir, json!({"cmd": "dlq_list", "limit": limit})).await?
            {
                Some(answer) => answer.get("dead_letters").cloned().unwrap_or(json!([])),
                None => serde_json::to_value(
                    control::offline_dead_letters(&dir, *limit)
                        .with_context(|| format!("reading {}", dir.display()))?,
                )?,
            };
            if *as_json {
                return print_line(&serde_json::to_string_pretty(&letters)?);
            }
            let list = letters.as_array().cloned().unwrap_or_default();
            print_line(&format!(
                "{:>6} {:<24} {:>8} {:<24} REASON",
                "ID", "DESTINATION", "ATTEMPTS", "KEY"
            ))?;
            for d in &list {
                let s = |k: &str| match d.get(k) {
                    None | Some(Value::Null) => "-".to_string(),
                    Some(v) => v.to_string().trim_matches('"').to_string(),
                };
                print_line(&format!(
                    "{:>6} {:<24} {:>8} {:<24} {}",
                    s("id"),
                    s("destination"),
                    s("attempts"),
                    s("key"),
                    s("reason")
                ))?;
            }
            print_line(&format!("{} dead letter(s)", list.len()))
        }
        DlqAction::Move { log } => {
            let n = match ask(&dir, json!({"cmd": "dlq_move", "log": log})).await? {
                Some(answer) => answer.get("moved").and_then(Value::as_u64).unwrap_or(0),
                None => {
                    let moved = control::offline_dead_letter_log(&dir, log)
                        .with_context(|| format!("moving {log} in {}", dir.display()))?;
                    if moved == 0 {
                        bail!(
                            "no log named `{log}` holds an entry in the stopped node's {} \
                             (`peerbus status` lists the logs)",
                            dir.display()
                        );
                    }
                    moved as u64
                }
            };
            print_line(&format!(
                "moved {n} waiting message(s) of {log} to the dead letters"
            ))
        }
        DlqAction::Replay { ids, all } => {
            let req = if *all {
                json!({"cmd": "dlq_replay", "all": true})
            } else {
                json!({"cmd": "dlq_replay", "ids": ids})
            };
            let answer = ask(&dir, req).await?.ok_or_else(|| {
                anyhow!("no node is running on {}: start it (`peerbus node --data-dir ...`), then replay", dir.display())
            })?;
            let n = answer.get("replayed").and_then(Value::as_u64).unwrap_or(0);
            print_line(&format!("replayed {n} dead letter(s)"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_list_line_names_the_next_update_and_warns_once_it_is_past() {
        let list = serde_json::json!({
            "ca": "CN=peerbus mesh CA shop", "number": "3",
            "issued": 1_800_000_000u64, "next_update": 1_800_086_400u64, "revoked": 2,
        });
        let fresh = list_line(&list, 1_800_000_100);
        assert_eq!(
            fresh,
            "  list 3 of CN=peerbus mesh CA shop, issued 2027-01-15T08:00:00Z, next update \
             2027-01-16T08:00:00Z: 2 revoked"
        );
        let stale = list_line(&list, 1_800_086_400);
        assert!(
            stale.starts_with(&fresh) && stale.contains("; PAST ITS NEXT UPDATE"),
            "{stale}"
        );
        // A list that names no next update is never past it.
        let mut undated = list.clone();
        undated["next_update"] = serde_json::Value::Null;
        assert!(list_line(&undated, u64::MAX).ends_with(": 2 revoked"));
    }
}
