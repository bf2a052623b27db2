//! `corral`: the control-plane server, the development stack and the CLI.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use corral_api::client::{self, AdminCommand, Connection, SandboxCommand};
use corral_api::dev::{self, DevConfig};
use corral_api::server::{Server, ServerConfig};

/// jemalloc: glibc's malloc was a sixth of the CPU under load, and
/// mimalloc held a third more memory (docs/performance.md, "Optimisations").
/// Built with background threads on (the workspace's `background_threads`
/// feature): freed pages go back to the system as they decay even while the
/// process is quiet. Without them the pages that dormant sandboxes' actors
/// held stayed resident until later allocations happened to purge them.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser, Debug)]
#[command(name = "corral", version, about = "Corral sandbox orchestrator")]
struct Cli {
    #[command(flatten)]
    connection: Connection,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the control plane (REST API and agent service).
    Server(ServerConfig),
    /// Run the control plane with SQLite and a local agent, ready to use.
    Dev(DevConfig),
    /// Create, inspect and drive sandboxes (needs CORRAL_API_KEY).
    #[command(subcommand)]
    Sandbox(SandboxCommand),
    /// Operator commands (needs CORRAL_ADMIN_TOKEN).
    #[command(subcommand)]
    Admin(AdminCommand),
    /// Your organisation's balance, ledger and usage (needs CORRAL_API_KEY).
    #[command(subcommand)]
    Billing(client::BillingCommand),
}

#[tokio::main]
async fn main() -> ExitCode {
    // Before any HTTP client or TLS config is built (reqwest has no
    // provider of its own).
    corral_api::tls::install_crypto_provider();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Server(config) => {
            let mut telemetry = corral_telemetry::init("corral-control-plane", config.log_format);
            let result = run_server(config).await.map(|()| ExitCode::SUCCESS);
            tokio::task::block_in_place(|| telemetry.shutdown());
            result
        }
        Command::Dev(config) => {
            let mut telemetry =
                corral_telemetry::init("corral-control-plane", config.server.log_format);
            let result = dev::run(config).await.map(|()| ExitCode::SUCCESS);
            tokio::task::block_in_place(|| telemetry.shutdown());
            result
        }
        Command::Sandbox(cmd) => client::run_sandbox(&cli.connection, cmd).await,
        Command::Admin(cmd) => client::run_admin(&cli.connection, cmd).await,
        Command::Billing(cmd) => client::run_billing(&cli.connection, cmd).await,
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run_server(config: ServerConfig) -> anyhow::Result<()> {
    if config.admin_token.is_none() {
        tracing::warn!("no admin token configured (CORRAL_ADMIN_TOKEN): admin routes are closed");
    }
    let server = Server::start(config).await?;
    let control_plane = server.control_plane.clone();
    let failed = tokio::select! {
        _ = dev::shutdown_signal() => false,
        _ = control_plane.stopped() => true,
    };
    tracing::info!("shutting down");
    server.shutdown().await;
    anyhow::ensure!(
        !failed,
        "the actor tree stopped after repeated failures; restart to rebuild it from the database"
    );
    Ok(())
}
