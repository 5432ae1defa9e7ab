//! The Outpost cloud binary. The coordinator arrives with the cloud issue; until then
//! this parses its command line only.

use clap::Parser;

/// Outpost cloud coordinator: the hub replica that edges sync with over QUIC.
#[derive(Debug, Parser)]
#[command(name = "outpost-cloud", version)]
struct Cli {
    /// Configuration file (TOML).
    #[arg(long, short)]
    config: Option<std::path::PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    anyhow::bail!(
        "the cloud coordinator is not built yet (config: {:?}); see the project's issues",
        cli.config
    )
}
