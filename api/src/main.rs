//! `corral`: the control-plane server, the development stack and the CLI.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use corral_api::client::{self, AdminCommand, Connection, SandboxCommand};
use corral_api::dev::{self, DevConfig};
use corral_api::server::{Server, ServerConfig};

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

fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let json = std::env::var("CORRAL_LOG_FORMAT").is_ok_and(|f| f == "json");
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    // Before any HTTP client or TLS config is built (reqwest has no
    // provider of its own).
    corral_api::tls::install_crypto_provider();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Server(config) => {
            init_logging();
            run_server(config).await.map(|()| ExitCode::SUCCESS)
        }
        Command::Dev(config) => {
            init_logging();
            dev::run(config).await.map(|()| ExitCode::SUCCESS)
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
