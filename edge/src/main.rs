//! `outpost-edge`: parses flags, starts tracing, loads config, calls `edge::run`.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use edge::auth::{api_key_hash, Action};
use edge::config::EdgeConfig;
use edge::startup::{dev_secret, init_tracing, mint_token, wait_for_signal, GentokenArgs};
use figment::providers::Serialized;
use figment::Figment;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

/// Outpost edge node: real-time delivery and collaboration for browsers and backend
/// services, with durable local storage.
#[derive(Debug, Parser)]
#[command(name = "outpost-edge", version)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Debug, clap::Args, Serialize, Default)]
struct RunArgs {
    /// Configuration file (TOML).
    #[arg(long, short, global = true)]
    #[serde(skip)]
    config: Option<PathBuf>,
    /// Address for the client gateway (overrides `listen`). Port 0 picks a free port.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    listen: Option<String>,
    /// Data directory (overrides `data_dir`).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    data_dir: Option<PathBuf>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    region: Option<String>,
    /// Development mode: a dev JWT secret kept in the data dir, a ready token printed.
    #[arg(long)]
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    dev: bool,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run the edge (the default).
    Run,
    /// Print a commented default configuration.
    Genconfig,
    /// Validate a configuration file (with the OUTPOST_* environment applied, as at
    /// start) and exit.
    Checkconfig { file: PathBuf },
    /// Mint an HS256 client token.
    Gentoken(GentokenArgs),
    /// Print the SHA-256 of an API key, for `auth.api_keys[].sha256`.
    HashKey { key: String },
}

fn main() -> std::process::ExitCode {
    edge::startup::exit_code(run(Cli::parse()))
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.cmd {
        Some(Cmd::Genconfig) => {
            print!(
                "{}",
                edge::config::generated_toml()
                    .map_err(|e| anyhow::anyhow!("no randomness for the secret: {e}"))?
            );
            return Ok(());
        }
        Some(Cmd::Checkconfig { file }) => {
            // As the server reads it: the file, then the OUTPOST_* environment.
            EdgeConfig::load(Some(&file), figment::Figment::new())
                .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
            for var in edge::config::ignored_env() {
                eprintln!("warning: {var} is not a configuration key: ignored");
            }
            println!("{}: ok", file.display());
            return Ok(());
        }
        Some(Cmd::Gentoken(args)) => {
            println!("{}", args.mint().map_err(anyhow::Error::msg)?);
            return Ok(());
        }
        Some(Cmd::HashKey { key }) => {
            println!("{}", api_key_hash(&key));
            return Ok(());
        }
        Some(Cmd::Run) | None => {}
    }
    let mut cfg = EdgeConfig::load_unvalidated(
        cli.run.config.as_deref(),
        Figment::from(Serialized::defaults(&cli.run)),
    )
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    let dev_token = if cfg.dev {
        let secret = dev_secret(&mut cfg)?;
        Some(
            mint_token(
                &secret,
                "dev-user",
                &["*".to_owned()],
                Action::ALL.to_vec(),
                86_400,
            )
            .map_err(anyhow::Error::msg)?,
        )
    } else {
        None
    };
    cfg.validate().map_err(|e| anyhow::anyhow!("{e}"))?;
    init_tracing(&cfg);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(cfg.listen)
            .await
            .with_context(|| format!("cannot listen on {}", cfg.listen))?;
        let addr = listener.local_addr()?;
        let shutdown = CancellationToken::new();
        // Storage first (it fails if another process holds the data dir): "listening"
        // means this edge is about to serve.
        let running = edge::start(cfg, shutdown.clone())?;
        println!("outpost-edge listening on {}://{addr}", running.scheme());
        if let Some(t) = &dev_token {
            println!("dev token (all rights, 24 h): {t}");
            println!("try: curl -s -X POST http://{addr}/v1/channels/project:1/events -H 'Authorization: Bearer {t}' -H 'content-type: application/json' -d '{{\"event\":\"ingest.job.created\",\"data\":{{\"job\":1}}}}'");
        }
        let stop = shutdown.clone();
        tokio::spawn(async move {
            wait_for_signal().await;
            tracing::info!("shutdown requested");
            stop.cancel();
        });
        edge::serve(&running, listener).await?;
        anyhow::Ok(())
    })
}
