//! What the binaries (`outpost-edge`, `outpost-cloud`, `outpost`) share at their top:
//! tracing setup, signal handling, dev secrets and token minting.

use crate::auth::{mint_hs256, Action, Claims, Right};
use crate::config::{EdgeConfig, LogFormat};

/// Starts tracing to stderr as the config says (`RUST_LOG` overrides the filter), and
/// warns about `OUTPOST_*` variables that are not configuration.
pub fn init_tracing(cfg: &EdgeConfig) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&cfg.log.filter));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour only on a terminal: logs sent to files and journals stay plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match cfg.log.format {
        LogFormat::Json => b.json().init(),
        LogFormat::Text => b.init(),
    }
    for var in crate::config::ignored_env() {
        tracing::warn!(%var, "environment variable ignored: not a configuration key");
    }
}

/// A binary's exit: an error is one `error: …` line on stderr (with its causes, `{:#}`)
/// and status 1 — what went wrong, never a backtrace: most are the user's to fix.
pub fn exit_code<E: std::fmt::Display>(r: Result<(), E>) -> std::process::ExitCode {
    match r {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn wait_for_signal() {
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

/// Dev mode: an HS256 secret kept in the data dir (so tokens survive restarts), unless
/// one is configured. Returns the secret in use.
pub fn dev_secret(cfg: &mut EdgeConfig) -> std::io::Result<String> {
    if let Some(s) = &cfg.auth.hs256_secret {
        return Ok(s.clone());
    }
    std::fs::create_dir_all(&cfg.data_dir)?;
    let path = cfg.data_dir.join("dev-jwt-secret");
    let secret = match std::fs::read_to_string(&path) {
        Ok(s) if s.trim().len() >= 32 => s.trim().to_owned(),
        _ => {
            let r = |_| getrandom::u64().map_err(|e| std::io::Error::other(e.to_string()));
            let s = format!("dev-{:016x}{:016x}", r(0)?, r(1)?);
            std::fs::write(&path, &s)?;
            s
        }
    };
    cfg.auth.hs256_secret = Some(secret.clone());
    Ok(secret)
}

/// Parses `subscribe,publish,state,presence`.
pub fn parse_actions(s: &str) -> Result<Vec<Action>, String> {
    s.split(',')
        .map(|a| {
            serde_json::from_value(serde_json::Value::String(a.trim().to_owned())).map_err(|_| {
                format!("unknown action {a:?}: use subscribe, publish, state, presence")
            })
        })
        .collect()
}

/// Mints an HS256 client token granting `actions` on each of `channels`, valid for
/// `ttl` seconds.
pub fn mint_token(
    secret: &str,
    sub: &str,
    channels: &[String],
    actions: Vec<Action>,
    ttl: u64,
) -> Result<String, String> {
    mint_hs256(
        secret,
        &Claims {
            sub: sub.into(),
            exp: crate::core::now_ms() / 1000 + ttl,
            nbf: None,
            aud: None,
            iss: None,
            rights: channels
                .iter()
                .map(|c| Right {
                    channels: c.clone(),
                    actions: actions.clone(),
                })
                .collect(),
        },
    )
}

/// `gentoken`, the same in `outpost-edge` and `outpost`.
#[derive(Debug, Clone, clap::Args)]
pub struct GentokenArgs {
    /// The HS256 secret the servers verify with (`auth.hs256_secret`; a dev server
    /// keeps its own in `<data_dir>/dev-jwt-secret`).
    #[arg(long, env = "OUTPOST_AUTH__HS256_SECRET", hide_env_values = true)]
    pub secret: String,
    /// Who the token is for: the `sub` claim, shown in presence and stamped on logs.
    #[arg(long, default_value = "dev-user")]
    pub sub: String,
    /// Channel patterns the token grants rights on: `*` (every channel), an exact
    /// name, or a prefix ending in `*` (`project:42*`). Repeat the flag or separate
    /// with commas: `--channels project:42,project:42/*`.
    #[arg(long, default_value = "*", value_delimiter = ',', num_args = 1..)]
    pub channels: Vec<String>,
    /// What the token may do on those channels, comma-separated: subscribe (also
    /// history, state and presence reads), publish, state (write keys), presence.
    #[arg(long, default_value = "subscribe,publish,state,presence")]
    pub actions: String,
    /// Lifetime in seconds (the `exp` claim).
    #[arg(long, default_value_t = 86_400)]
    pub ttl: u64,
}

impl GentokenArgs {
    /// The token, or why not.
    pub fn mint(&self) -> Result<String, String> {
        let actions = parse_actions(&self.actions)?;
        mint_token(&self.secret, &self.sub, &self.channels, actions, self.ttl)
    }
}
