//! The Outpost edge binary. The node itself arrives with the edge issue; until then
//! this parses its command line only.

use clap::Parser;

/// Outpost edge node: low-latency real-time delivery and collaboration for browsers,
/// replicated to the cloud over QUIC.
#[derive(Debug, Parser)]
#[command(name = "outpost-edge", version)]
struct Cli {
    /// Configuration file (TOML).
    #[arg(long, short)]
    config: Option<std::path::PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    anyhow::bail!(
        "the edge node is not built yet (config: {:?}); see the project's issues",
        cli.config
    )
}
