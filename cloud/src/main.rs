//! `outpost-cloud`: parses flags, starts tracing, loads config, calls `cloud::start`.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use edge::config::{CloudConfig, HubConfig};
use figment::providers::Serialized;
use figment::Figment;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

/// Outpost cloud coordinator: the hub replica edges sync with over QUIC. Serves the
/// same client API as the edges.
#[derive(Debug, Parser)]
#[command(name = "outpost-cloud", version)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Debug, clap::Args, Serialize, Default)]
struct RunArgs {
    /// Configuration file (TOML): the edge's keys plus a [hub] section.
    #[arg(long, short, global = true)]
    #[serde(skip)]
    config: Option<PathBuf>,
    /// Client gateway address (HTTP, WebSocket, SSE). Port 0 picks a free port.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    listen: Option<String>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    data_dir: Option<PathBuf>,
    /// QUIC address edges connect to (overrides hub.listen).
    #[arg(long)]
    #[serde(skip)]
    quic_listen: Option<std::net::SocketAddr>,
    /// Development mode: self-signed certificate, dev JWT secret in the data dir.
    #[arg(long)]
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    dev: bool,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run the cloud (the default).
    Run,
    /// Validate a configuration file (with the OUTPOST_* environment applied, as at
    /// start) and exit.
    Checkconfig { file: PathBuf },
}

fn main() -> std::process::ExitCode {
    edge::startup::exit_code(run(Cli::parse()))
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.cmd {
        Some(Cmd::Checkconfig { file }) => {
            // As the server reads it: the file, then the OUTPOST_* environment.
            let cfg = CloudConfig::load(Some(&file), Figment::new())
                .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
            if cfg.hub.is_none() {
                anyhow::bail!("{}: hub: the cloud needs a [hub] section", file.display());
            }
            for var in edge::config::ignored_env() {
                eprintln!("warning: {var} is not a configuration key: ignored");
            }
            println!("{}: ok", file.display());
            return Ok(());
        }
        Some(Cmd::Run) | None => {}
    }
    let mut cfg = CloudConfig::load_unvalidated(
        cli.run.config.as_deref(),
        Figment::from(Serialized::defaults(&cli.run)),
    )
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    let hub = cfg.hub.get_or_insert_with(HubConfig::default);
    if let Some(q) = cli.run.quic_listen {
        hub.listen = q;
    }
    if cfg.dev {
        edge::startup::dev_secret(&mut cfg)?;
    }
    cfg.validate().map_err(|e| anyhow::anyhow!("{e}"))?;
    edge::startup::init_tracing(&cfg);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    rt.block_on(async move {
        let http = tokio::net::TcpListener::bind(cfg.listen)
            .await
            .with_context(|| format!("cannot listen on {}", cfg.listen))?;
        let shutdown = CancellationToken::new();
        let started = cloud::start(cfg, http, shutdown.clone()).await?;
        println!(
            "outpost-cloud listening on {}://{}",
            started.scheme(),
            started.http_addr()?
        );
        println!("outpost-cloud quic on {}", started.quic_addr);
        println!("outpost-cloud certificate sha256 {}", started.fingerprint);
        let stop = shutdown.clone();
        tokio::spawn(async move {
            edge::startup::wait_for_signal().await;
            tracing::info!("shutdown requested");
            stop.cancel();
        });
        started.serve().await?;
        anyhow::Ok(())
    })
}
