//! `outpost-edge`: parses flags, starts tracing, loads config, calls `edge::run`.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use edge::auth::{api_key_hash, mint_hs256, Action, Claims, Right};
use edge::config::{EdgeConfig, LogFormat, DEFAULT_TOML};
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
    /// Validate a configuration file and exit.
    Checkconfig { file: PathBuf },
    /// Mint an HS256 client token.
    Gentoken {
        /// The HS256 secret (as in `auth.hs256_secret`).
        #[arg(long, env = "OUTPOST_AUTH__HS256_SECRET")]
        secret: String,
        #[arg(long, default_value = "dev-user")]
        sub: String,
        /// Channel pattern the token grants rights on.
        #[arg(long, default_value = "*")]
        channels: String,
        /// Comma-separated actions: subscribe,publish,state,presence.
        #[arg(long, default_value = "subscribe,publish,state,presence")]
        actions: String,
        /// Lifetime in seconds.
        #[arg(long, default_value_t = 86_400)]
        ttl: u64,
    },
    /// Print the SHA-256 of an API key, for `auth.api_keys[].sha256`.
    HashKey { key: String },
}

fn parse_actions(s: &str) -> anyhow::Result<Vec<Action>> {
    s.split(',')
        .map(|a| {
            serde_json::from_value(serde_json::Value::String(a.trim().to_owned())).with_context(
                || format!("unknown action {a:?} (subscribe, publish, state, presence)"),
            )
        })
        .collect()
}

fn token(
    secret: &str,
    sub: &str,
    channels: &str,
    actions: Vec<Action>,
    ttl: u64,
) -> anyhow::Result<String> {
    let now = edge::core::now_ms() / 1000;
    mint_hs256(
        secret,
        &Claims {
            sub: sub.into(),
            exp: now + ttl,
            nbf: None,
            aud: None,
            iss: None,
            rights: vec![Right {
                channels: channels.into(),
                actions,
            }],
        },
    )
    .map_err(|e| anyhow::anyhow!(e))
}

fn init_tracing(cfg: &EdgeConfig) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&cfg.log.filter));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cfg.log.format {
        LogFormat::Json => b.json().init(),
        LogFormat::Text => b.init(),
    }
}

/// Dev mode: a secret kept in the data dir, so tokens survive restarts.
fn dev_secret(cfg: &mut EdgeConfig) -> anyhow::Result<String> {
    if let Some(s) = &cfg.auth.hs256_secret {
        return Ok(s.clone());
    }
    std::fs::create_dir_all(&cfg.data_dir)?;
    let path = cfg.data_dir.join("dev-jwt-secret");
    let secret = match std::fs::read_to_string(&path) {
        Ok(s) if s.trim().len() >= 32 => s.trim().to_owned(),
        _ => {
            let s = format!("dev-{:016x}{:016x}", getrandom::u64()?, getrandom::u64()?);
            std::fs::write(&path, &s)?;
            s
        }
    };
    cfg.auth.hs256_secret = Some(secret.clone());
    Ok(secret)
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Some(Cmd::Genconfig) => {
            print!("{DEFAULT_TOML}");
            return Ok(());
        }
        Some(Cmd::Checkconfig { file }) => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            EdgeConfig::from_toml(&text).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
            println!("{}: ok", file.display());
            return Ok(());
        }
        Some(Cmd::Gentoken {
            secret,
            sub,
            channels,
            actions,
            ttl,
        }) => {
            println!(
                "{}",
                token(&secret, &sub, &channels, parse_actions(&actions)?, ttl)?
            );
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
        Some(token(
            &secret,
            "dev-user",
            "*",
            Action::ALL.to_vec(),
            86_400,
        )?)
    } else {
        None
    };
    cfg.validate().map_err(|e| anyhow::anyhow!("{e}"))?;
    init_tracing(&cfg);
    for var in edge::config::ignored_env() {
        tracing::warn!(%var, "environment variable ignored: not a configuration key");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(cfg.listen)
            .await
            .with_context(|| format!("cannot listen on {}", cfg.listen))?;
        let addr = listener.local_addr()?;
        println!("outpost-edge listening on http://{addr}");
        if let Some(t) = &dev_token {
            println!("dev token (all rights, 24 h): {t}");
            println!("try: curl -s -X POST http://{addr}/v1/channels/project:1/events -H 'Authorization: Bearer {t}' -H 'content-type: application/json' -d '{{\"event\":\"ingest.job.created\",\"data\":{{\"job\":1}}}}'");
        }
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            wait_for_signal().await;
            tracing::info!("shutdown requested");
            stop.cancel();
        });
        edge::run(cfg, listener, shutdown).await?;
        anyhow::Ok(())
    })
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}
