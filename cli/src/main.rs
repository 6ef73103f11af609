//! `peerbus`: the command line of the peerbus messaging mesh.
//!
//! Thin by design: each command parses its arguments, calls the `peerbus` library and
//! prints. Data goes to stdout; logs (`RUST_LOG`) go to stderr. Exit codes: 0 success,
//! 1 the operation failed, 2 usage error.

mod admin;
mod bench;
mod ca;
mod chaos;
mod commands;
mod common;
mod demo;
mod output;
mod produce;
mod template;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// mimalloc instead of the system allocator: a node allocates and frees small buffers
/// (envelopes, frames, receipts) on every message, across threads, and glibc malloc was a
/// fifth of the CPU time of the send benchmarks (`peerbus bench`). Built with `no_thp`: with
/// transparent huge pages its eagerly committed arenas doubled an idle node's resident size
/// (24.8 MiB against 11-12). Applications embedding the library pick their own allocator.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A brokerless messaging mesh: run nodes, send, publish, subscribe, request, list peers.
///
/// Every option of the mesh can also be set in the environment (PEERBUS_MESH,
/// PEERBUS_MESH_KEY_FILE, PEERBUS_INSECURE_OPEN_MESH, PEERBUS_INTERFACE, PEERBUS_LISTEN,
/// PEERBUS_DATA_DIR, PEERBUS_SEEDS, PEERBUS_NO_NEW_TRACES).
#[derive(Debug, Parser)]
#[command(name = "peerbus", version, propagate_version = true)]
struct Cli {
    #[command(flatten)]
    common: common::CommonArgs,
    #[command(subcommand)]
    command: Command,
}

/// The commands.
#[derive(Debug, Subcommand)]
enum Command {
    /// Write a new mesh key to a file (never overwrites).
    Keygen(commands::KeygenArgs),
    /// A mesh CA: membership by node certificates instead of a shared mesh key (`ca new`,
    /// `ca issue`, or `ca request` for the CA of an existing PKI).
    Ca(ca::CaArgs),
    /// Run a node of a service until Ctrl-C or SIGTERM.
    Node(commands::NodeArgs),
    /// Send messages to a service and wait until they are acknowledged.
    Send(commands::SendArgs),
    /// Publish messages on a topic and wait until every subscriber group acknowledged them.
    Pub(commands::PubArgs),
    /// Print messages published on a topic as JSON lines until Ctrl-C.
    Sub(commands::SubArgs),
    /// Send a request to a service and print the reply.
    Req(commands::ReqArgs),
    /// Ask every instance of a service (or every subscriber of a topic) and print the replies
    /// that arrive in time.
    Scatter(commands::ScatterArgs),
    /// List the peers this machine can see.
    Peers(commands::PeersArgs),
    /// Release a durable subscriber group for good: every node forgets it and publishers drop
    /// the copies they kept for it. For a group whose services are gone; stop its
    /// subscribers first (a node still subscribed to it keeps it).
    ReleaseGroup(commands::ReleaseGroupArgs),
    /// Tell the payment story on loopback: real services, one killed and restarted, every
    /// message accounted for.
    Demo(demo::DemoArgs),
    /// One service of `peerbus demo` (started by the demo itself).
    #[command(hide = true)]
    DemoService(demo::ServiceArgs),
    /// Show a node's logs (waiting, in flight, oldest) and counters; works on a running node
    /// (through its control socket) and on a stopped node's --data-dir.
    Status(admin::StatusArgs),
    /// Make the running node in --data-dir read its mesh files now: its CA files (CA,
    /// revocation lists, its certificate; otherwise read every minute) after `peerbus ca
    /// revoke` or `peerbus ca issue`, or its --mesh-key-file for a step of a key rotation
    /// without a restart. SIGHUP to `peerbus node` does the same.
    Reload(admin::ReloadArgs),
    /// List the messages a node's logs hold, not yet acknowledged by a consumer (oldest
    /// first per log; waiting or in flight, and to which node); works on a running node and
    /// on a stopped node's --data-dir.
    Entries(admin::EntriesArgs),
    /// Inspect and replay dead letters of the node in --data-dir.
    Dlq(admin::DlqArgs),
    /// Run the benchmark suite on loopback, each case beside its baseline (prints a table;
    /// --json FILE for tools).
    Bench(bench::BenchArgs),
    /// Chaos-test a local mesh: kill, freeze, restart and partition node processes on a seeded
    /// schedule under load, then check from every node's journal that no acknowledged message
    /// was lost or handled out of key order. Exits 1 when an invariant is broken. Give its
    /// options right after `peerbus chaos` (see `peerbus chaos --help`).
    Chaos(chaos::ChaosPlaceholder),
}

impl Command {
    /// Log level when `RUST_LOG` is not set: `info` for a long-running node, `warn` for the
    /// rest, whose stdout is their output.
    fn default_log_level(&self) -> &'static str {
        match self {
            Command::Node(_) => "info",
            // Its stdout is the demo's report channel; only errors go to the shared stderr.
            Command::DemoService(_) => "error",
            _ => "warn",
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let common = &cli.common;
    match &cli.command {
        Command::Keygen(args) => commands::keygen(args),
        Command::Ca(args) => ca::run(common, args),
        Command::Node(args) => commands::node(common, args).await,
        Command::Send(args) => commands::send(common, args).await,
        Command::Pub(args) => commands::publish(common, args).await,
        Command::Sub(args) => commands::sub(common, args).await,
        Command::Req(args) => commands::req(common, args).await,
        Command::Scatter(args) => commands::scatter(common, args).await,
        Command::Peers(args) => commands::peers(common, args).await,
        Command::ReleaseGroup(args) => commands::release_group(common, args).await,
        Command::Demo(args) => demo::run(args).await,
        Command::DemoService(args) => demo::run_service(args).await,
        Command::Status(args) => admin::status(common, args).await,
        Command::Reload(args) => admin::reload(common, args).await,
        Command::Entries(args) => admin::entries(common, args).await,
        Command::Dlq(args) => admin::dlq(common, args).await,
        Command::Bench(args) => bench::run(args).await,
        Command::Chaos(_) => Err(common::UsageError(
            "`peerbus chaos` takes no global options: write `peerbus chaos --help` for its own"
                .into(),
        )
        .into()),
    }
}

fn main() -> ExitCode {
    // `chaos` (and its hidden `chaos-worker`) parse their own options: its `--seed` is a
    // number, not the global `--seed ADDR`.
    let chaos = chaos::parse_direct();
    let cli = if chaos.is_none() {
        Some(Cli::parse())
    } else {
        None
    };
    common::init_logging(
        cli.as_ref()
            .map_or("warn", |c| c.command.default_log_level()),
    );
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: could not start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match (cli, chaos) {
            (Some(cli), _) => run(cli).await,
            (None, Some(chaos)) => chaos.run().await,
            (None, None) => Ok(()),
        }
    });
    // Tasks left behind by a failed start must not hold the process open.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            if e.downcast_ref::<common::UsageError>().is_some() {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}
