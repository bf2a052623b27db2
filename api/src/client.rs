//! The `corral sandbox ...` and `corral admin ...` commands: a small REST
//! client over HTTP or HTTPS (reqwest with rustls and the ring provider;
//! `--ca-cert` to trust a private CA, `--client-cert`/`--client-key` for a
//! client certificate), printing for people on stdout.
//!
//! Errors come back as `anyhow` errors whose text is what the user should
//! read after `error: `; an API error reads `<message> (<code>)`.

use std::collections::BTreeMap;
use std::fmt;
use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use reqwest::{Method, StatusCode, Url};
use serde::Deserialize;
use serde_json::{json, Value};

/// Where the server is and who we are. Flattened into the top-level CLI.
#[derive(clap::Args, Debug, Clone)]
pub struct Connection {
    /// Base URL of the REST API.
    #[arg(
        long,
        env = "CORRAL_URL",
        default_value = "http://127.0.0.1:7070",
        global = true
    )]
    pub url: String,
    /// Organisation API key (for sandbox commands).
    #[arg(long, env = "CORRAL_API_KEY", global = true, hide_env_values = true)]
    pub api_key: Option<String>,
    /// Platform admin token (for admin commands).
    #[arg(
        long,
        env = "CORRAL_ADMIN_TOKEN",
        global = true,
        hide_env_values = true
    )]
    pub admin_token: Option<String>,
    /// PEM CA certificate to verify an https server with (instead of the
    /// system's roots).
    #[arg(long, env = "CORRAL_CA_CERT", global = true, value_name = "PEM")]
    pub ca_cert: Option<std::path::PathBuf>,
    /// PEM client certificate to present (with --client-key).
    #[arg(
        long,
        env = "CORRAL_CLIENT_CERT",
        global = true,
        value_name = "PEM",
        requires = "client_key"
    )]
    pub client_cert: Option<std::path::PathBuf>,
    /// PEM private key of --client-cert.
    #[arg(
        long,
        env = "CORRAL_CLIENT_KEY",
        global = true,
        value_name = "PEM",
        requires = "client_cert"
    )]
    pub client_key: Option<std::path::PathBuf>,
}

/// The HTTP client for `conn`: rustls (ring), the CA and client
/// certificate when given.
fn http_client(conn: &Connection) -> anyhow::Result<reqwest::Client> {
    crate::tls::install_crypto_provider();
    let mut builder = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .user_agent(concat!("corral/", env!("CARGO_PKG_VERSION")));
    if let Some(path) = &conn.ca_cert {
        let pem = std::fs::read(path)
            .with_context(|| format!("reading the CA certificate {}", path.display()))?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem)
            .with_context(|| format!("{} is not a PEM certificate", path.display()))?;
        if certs.is_empty() {
            bail!("{} holds no PEM certificate", path.display());
        }
        builder = builder.tls_certs_only(certs);
    }
    if let (Some(cert), Some(key)) = (&conn.client_cert, &conn.client_key) {
        let mut pem = std::fs::read(cert)
            .with_context(|| format!("reading the client certificate {}", cert.display()))?;
        pem.push(b'\n');
        pem.extend(
            std::fs::read(key)
                .with_context(|| format!("reading the client key {}", key.display()))?,
        );
        let identity = reqwest::Identity::from_pem(&pem).with_context(|| {
            format!(
                "{} and {} are not a PEM certificate and key",
                cert.display(),
                key.display()
            )
        })?;
        builder = builder.identity(identity);
    }
    builder.build().context("cannot set up the HTTP client")
}

/// `corral admin orgs ...`
#[derive(clap::Subcommand, Debug)]
pub enum OrgsCommand {
    /// List organisations (the default).
    List,
    /// Set an org's placement settings (both; a change replaces them).
    Placement {
        /// Organisation id.
        org_id: String,
        /// true: every create of the org is placed only on its private
        /// pool (no_capacity when it is full); false: as requests ask.
        #[arg(long, required = true, action = clap::ArgAction::Set, value_name = "true|false")]
        private_pool_only: bool,
        /// Whether its creates may choose `--strategy`: allow, deny, or
        /// default (as the server's `--no-strategy-override` says).
        #[arg(long, default_value = "default", value_parser = ["allow", "deny", "default"])]
        strategy_override: String,
    },
}

/// `corral admin hosts ...`
#[derive(clap::Subcommand, Debug)]
pub enum HostsCommand {
    /// List hosts (the default).
    List,
    /// Show one host as JSON.
    Get { id: String },
    /// No new placements on the host; what runs there stays.
    Cordon { id: String },
    /// The host takes placements again.
    Uncordon { id: String },
    /// No new placements; its sandboxes move to other hosts
    /// (restart policy on_host_loss) or stop.
    Drain {
        id: String,
        /// Kill a stopping sandbox that has not exited after N seconds
        /// (1-3600; default: the server's stop grace).
        #[arg(long, value_name = "N")]
        deadline_seconds: Option<u64>,
    },
    /// Remove an empty host from the fleet for good (revokes its tokens).
    Decommission { id: String },
}

/// A host's labels as `k=v,k=v`.
fn labels_text(host: &Value) -> String {
    host.get("labels")
        .and_then(Value::as_object)
        .map(|labels| {
            labels
                .iter()
                .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
                .collect::<Vec<_>>()
                .join(",")
        })
        .filter(|t| !t.is_empty())
        .unwrap_or_else(|| "-".into())
}

/// `corral sandbox ...`
// Parsed once per process: the size of `Create` does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(clap::Subcommand, Debug)]
pub enum SandboxCommand {
    /// Create a sandbox running COMMAND in IMAGE (waits until it runs).
    Create {
        /// Image to run (as known to the hosts, e.g. `busybox`).
        image: String,
        /// A name, unique among your sandboxes.
        #[arg(long)]
        name: Option<String>,
        /// CPU in thousandths of a core (default 1000).
        #[arg(long, value_name = "N")]
        cpu_millis: Option<i64>,
        /// Memory in MiB (default 256).
        #[arg(long, value_name = "N")]
        memory_mb: Option<i64>,
        /// Destroy the sandbox after this many seconds.
        #[arg(long, value_name = "N")]
        ttl_seconds: Option<i64>,
        /// Environment variable for COMMAND (repeatable).
        #[arg(long = "env", value_name = "K=V", value_parser = parse_key_value)]
        env: Vec<(String, String)>,
        /// Label on the sandbox (repeatable).
        #[arg(long = "label", value_name = "K=V", value_parser = parse_key_value)]
        labels: Vec<(String, String)>,
        /// Working directory of COMMAND (absolute).
        #[arg(long, value_name = "PATH")]
        workdir: Option<String>,
        /// Secret environment variable (repeatable): encrypted at rest,
        /// shown as ***. `K` alone takes the value of K in this shell's
        /// environment, which keeps it out of the process list.
        #[arg(long = "secret-env", value_name = "K[=V]", value_parser = parse_secret_env)]
        secret_env: Vec<(String, String)>,
        /// Network: none (default, loopback only) or host (if the server allows it).
        #[arg(long, value_name = "none|host")]
        network: Option<String>,
        /// Mount the root filesystem read-only.
        #[arg(long)]
        read_only_root: bool,
        /// Most processes/threads in the sandbox (default: the host's).
        #[arg(long, value_name = "N")]
        pids_limit: Option<i64>,
        /// Run in a user namespace (root inside is unprivileged on the host).
        #[arg(long)]
        user_namespace: bool,
        /// Return as soon as the sandbox is accepted, without waiting for it to run.
        #[arg(long)]
        no_wait: bool,
        /// Print the sandbox as JSON.
        #[arg(long)]
        json: bool,
        /// Placement strategy for this sandbox: spread or binpack.
        #[arg(long, value_name = "STRATEGY")]
        strategy: Option<String>,
        /// A host label the host must carry (repeatable; all must match).
        #[arg(long = "selector", value_name = "K=V", value_parser = parse_key_value)]
        selector: Vec<(String, String)>,
        /// The runtime the host must run: runc, docker, process or fake.
        #[arg(long, value_name = "KIND")]
        runtime: Option<String>,
        /// Spread sandboxes sharing this label's value over hosts.
        #[arg(long, value_name = "LABEL")]
        spread_by: Option<String>,
        /// Only the org's private pool.
        #[arg(long)]
        private_pool_only: bool,
        /// Wait up to N ms for capacity instead of failing with no_capacity.
        #[arg(long, value_name = "N")]
        wait_timeout_ms: Option<u64>,
        /// never (default) or on_host_loss (created again on another host
        /// when its host is lost or drained).
        #[arg(long, value_name = "POLICY")]
        restart_policy: Option<String>,
        /// The sandbox's main process and its arguments (after `--`).
        #[arg(
            required = true,
            num_args = 1..,
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "COMMAND"
        )]
        command: Vec<String>,
    },
    /// List your sandboxes (all pages unless --limit).
    List {
        /// Only sandboxes in this state (e.g. running, stopped, failed).
        #[arg(long)]
        state: Option<String>,
        /// Only sandboxes with this label (repeatable; all must match).
        #[arg(long = "label", value_name = "K=V", value_parser = parse_key_value)]
        labels: Vec<(String, String)>,
        /// Fetch one page of at most N sandboxes.
        #[arg(long, value_name = "N")]
        limit: Option<u32>,
        /// Start after this cursor (printed by a previous --limit listing).
        #[arg(long, value_name = "CURSOR")]
        after: Option<String>,
        /// Print the sandboxes as a JSON array.
        #[arg(long)]
        json: bool,
    },
    /// Show one sandbox (as JSON).
    Get {
        /// Sandbox id.
        id: String,
        /// Print JSON (the default; accepted for symmetry).
        #[arg(long)]
        json: bool,
    },
    /// Run a command inside a running sandbox; exits with its exit code.
    Exec {
        /// Sandbox id.
        id: String,
        /// Kill the command after this many milliseconds (server default 60000).
        #[arg(long, value_name = "N")]
        timeout_ms: Option<u64>,
        /// Keep at most this many bytes of each of stdout and stderr (server default 65536).
        #[arg(long, value_name = "N")]
        max_output_bytes: Option<u64>,
        /// Environment variable for the command (repeatable).
        #[arg(long = "env", value_name = "K=V", value_parser = parse_key_value)]
        env: Vec<(String, String)>,
        /// Working directory of the command (absolute).
        #[arg(long, value_name = "PATH")]
        workdir: Option<String>,
        /// The command and its arguments (after `--`).
        #[arg(
            required = true,
            num_args = 1..,
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "ARGV"
        )]
        argv: Vec<String>,
    },
    /// Stop a sandbox (SIGTERM, then SIGKILL after the grace period).
    Stop {
        /// Sandbox id.
        id: String,
        /// Do not wait until it has stopped.
        #[arg(long)]
        no_wait: bool,
    },
    /// Start a stopped sandbox again.
    Start {
        /// Sandbox id.
        id: String,
        /// Do not wait until it runs.
        #[arg(long)]
        no_wait: bool,
    },
    /// Destroy a sandbox.
    Rm {
        /// Sandbox id.
        id: String,
        /// Do not wait until it is destroyed.
        #[arg(long)]
        no_wait: bool,
    },
}

/// `corral admin ...`
#[derive(clap::Subcommand, Debug)]
pub enum AdminCommand {
    /// Show the live actor supervision tree.
    Actors {
        /// Print the tree as JSON.
        #[arg(long)]
        json: bool,
        /// Redraw every SECONDS (default 2) until Ctrl-C.
        #[arg(long, value_name = "SECONDS", num_args = 0..=1, default_missing_value = "2",
              value_parser = clap::value_parser!(u64).range(1..=3600))]
        watch: Option<u64>,
        /// Only actors of this kind (host, connection, sandbox, ledger,
        /// scheduler, orgs, fleet, root), with their ancestors.
        #[arg(long)]
        kind: Option<String>,
        /// Only the actors of this org (its sandboxes and ledger).
        #[arg(long)]
        org: Option<String>,
        /// Only the actors of this host (the host, its connection and
        /// sandboxes).
        #[arg(long)]
        host: Option<String>,
    },
    /// Create an organisation and its first API key.
    CreateOrg {
        /// Organisation name.
        name: String,
    },
    /// List organisations (`orgs list`), or set one's placement.
    Orgs {
        #[command(subcommand)]
        action: Option<OrgsCommand>,
    },
    /// Issue a token for a host agent.
    CreateHostToken {
        /// A name for the token (e.g. the machine's name).
        name: String,
        /// An existing host to rotate the token of (default: a new host).
        #[arg(long)]
        host_id: Option<String>,
        /// Put the host in this org's private pool (only its sandboxes go
        /// there).
        #[arg(long)]
        org_id: Option<String>,
    },
    /// List host tokens.
    HostTokens,
    /// Revoke a host token.
    RevokeHostToken {
        /// Host token id.
        id: String,
    },
    /// List hosts with their state, capacity and allocation (`hosts list`),
    /// or cordon, uncordon, drain or decommission one.
    Hosts {
        #[command(subcommand)]
        action: Option<HostsCommand>,
    },
    /// Credit an organisation: a deposit, an adjustment (may be negative) or
    /// a refund.
    Credits {
        /// Organisation id.
        org_id: String,
        /// deposit, adjustment or refund.
        #[arg(long, default_value = "deposit")]
        kind: String,
        /// Amount in millionths of the currency unit.
        #[arg(long, value_name = "N", allow_negative_numbers = true)]
        amount_micros: i64,
        /// Idempotency reference: the same reference never credits twice.
        #[arg(long)]
        reference: String,
        /// Free-text description stored with the deposit.
        #[arg(long)]
        description: Option<String>,
    },
    /// Show an organisation's billing (balance, status, plan, quota).
    OrgBilling {
        /// Organisation id.
        org_id: String,
    },
    /// Change an organisation's plan, exemption or quota (the quota flags
    /// replace the whole quota when any is given).
    SetBilling {
        /// Organisation id.
        org_id: String,
        /// Price plan name.
        #[arg(long)]
        plan: Option<String>,
        /// Metered but never gated (true/false).
        #[arg(long)]
        exempt: Option<bool>,
        #[arg(long, value_name = "N")]
        max_sandboxes: Option<u64>,
        #[arg(long, value_name = "N")]
        max_cpu_millis: Option<u64>,
        #[arg(long, value_name = "N")]
        max_memory_mb: Option<u64>,
        #[arg(long, value_name = "N")]
        max_ttl_seconds: Option<u64>,
    },
    /// List price plans.
    Plans,
    /// Create a price plan (prices in micro-units per hour).
    CreatePlan {
        name: String,
        #[arg(long, value_name = "N")]
        cpu_micros_per_vcpu_hour: i64,
        #[arg(long, value_name = "N")]
        memory_micros_per_gib_hour: i64,
        #[arg(long, value_name = "N", default_value_t = 0)]
        stopped_memory_micros_per_gib_hour: i64,
    },
    /// Verify every ledger: balance = sum of entries, no period charged
    /// twice. Exits 1 if anything is off.
    BillingAudit,
}

/// Your organisation's money (needs CORRAL_API_KEY).
#[derive(clap::Subcommand, Debug)]
pub enum BillingCommand {
    /// Balance, status, plan, burn rate and quota.
    Show,
    /// Ledger entries, oldest first.
    Ledger {
        /// Entries after this id.
        #[arg(long, value_name = "ID")]
        after: Option<i64>,
        #[arg(long, value_name = "N", default_value_t = 100)]
        limit: u32,
    },
    /// Usage per sandbox and per day between two dates.
    Usage {
        /// RFC 3339 time or YYYY-MM-DD (default: 30 days ago).
        #[arg(long)]
        from: Option<String>,
        /// Exclusive end (default: now).
        #[arg(long)]
        to: Option<String>,
    },
}

pub async fn run_billing(conn: &Connection, cmd: BillingCommand) -> anyhow::Result<ExitCode> {
    let api = Api::new(conn, Auth::Org)?;
    match cmd {
        BillingCommand::Show => {
            let answer = api
                .call(Method::GET, api.url(&["v1", "billing"], &[]), None)
                .await?;
            print!("{}", billing_summary(&answer));
        }
        BillingCommand::Ledger { after, limit } => {
            let after = after.map(|a| a.to_string());
            let limit = limit.to_string();
            let mut query = vec![("limit", limit.as_str())];
            if let Some(after) = &after {
                query.push(("after", after.as_str()));
            }
            let answer = api
                .call(
                    Method::GET,
                    api.url(&["v1", "billing", "ledger"], &query),
                    None,
                )
                .await?;
            let rows: Vec<Vec<String>> = answer["entries"]
                .as_array()
                .map(|entries| {
                    entries
                        .iter()
                        .map(|e| {
                            vec![
                                show_int(int_field(e, &["id"])),
                                field(e, "kind"),
                                int_field(e, &["amount_micros"]).map_or("?".into(), micros),
                                field(e, "sandbox_id"),
                                field(e, "description"),
                            ]
                        })
                        .collect()
                })
                .unwrap_or_default();
            print!(
                "{}",
                render_table(&["ID", "KIND", "AMOUNT", "SANDBOX", "DESCRIPTION"], &rows)
            );
            if let Some(next) = int_field(&answer, &["next"]) {
                println!("more: --after {next}");
            }
        }
        BillingCommand::Usage { from, to } => {
            let mut query = Vec::new();
            if let Some(from) = &from {
                query.push(("from", from.as_str()));
            }
            if let Some(to) = &to {
                query.push(("to", to.as_str()));
            }
            let answer = api
                .call(Method::GET, api.url(&["v1", "usage"], &query), None)
                .await?;
            println!("{}", pretty(&answer));
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn billing_summary(b: &Value) -> String {
    let amount = |key: &str| int_field(b, &[key]).map_or("?".into(), micros);
    format!(
        "org {}: {} balance {} (held {}), burn {}/h, plan {}\n",
        field(b, "org_id"),
        field(b, "status"),
        amount("balance_micros"),
        amount("held_micros"),
        amount("burn_rate_micros_per_hour"),
        b.get("plan").map_or("-".into(), |p| field(p, "name")),
    )
}

/// Parses `K=V` (the value may itself contain `=`; the key may not be empty).
pub fn parse_key_value(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some(("", _)) => Err(format!("invalid KEY=VALUE {s:?}: the key is empty")),
        Some((k, v)) => Ok((k.to_string(), v.to_string())),
        None => Err(format!("invalid KEY=VALUE {s:?}: no '=' found")),
    }
}

/// `--secret-env`: `K=V`, or `K` alone for the value of `K` in this
/// process's environment. The error never echoes a value.
pub fn parse_secret_env(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some(("", _)) => Err("invalid --secret-env: the key is empty".into()),
        Some((k, v)) => Ok((k.to_string(), v.to_string())),
        None if s.is_empty() => Err("invalid --secret-env: the key is empty".into()),
        None => std::env::var(s)
            .map(|v| (s.to_string(), v))
            .map_err(|_| format!("--secret-env {s}: {s} is not set in the environment")),
    }
}

// ---------------------------------------------------------------------------
// HTTP plumbing
// ---------------------------------------------------------------------------

/// A non-2xx answer from the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: u16,
    /// The machine-readable code, when the body had the documented shape.
    pub code: Option<String>,
    /// What to show the user.
    pub message: String,
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.code {
            Some(code) => write!(f, "{} ({})", self.message, code),
            None => f.write_str(&self.message),
        }
    }
}

impl std::error::Error for ApiError {}

impl ApiError {
    /// Reads `{"error":{"code","message"}}`; anything else becomes the HTTP status.
    pub fn from_response(status: StatusCode, body: &[u8]) -> Self {
        #[derive(Deserialize)]
        struct Body {
            error: Inner,
        }
        #[derive(Deserialize)]
        struct Inner {
            code: String,
            message: String,
        }
        match serde_json::from_slice::<Body>(body) {
            Ok(b) => ApiError {
                status: status.as_u16(),
                code: Some(clean(&b.error.code)),
                message: clean(&b.error.message),
            },
            Err(_) => ApiError {
                status: status.as_u16(),
                code: None,
                message: format!("the server answered HTTP {status}"),
            },
        }
    }
}

/// Replaces control characters (terminal escapes, newlines) in text that
/// came from the server and goes into a line of output.
fn clean(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

#[derive(Clone, Copy)]
enum Auth {
    Org,
    Admin,
}

struct Api {
    http: reqwest::Client,
    base: Url,
    token: String,
}

impl Api {
    fn new(conn: &Connection, auth: Auth) -> anyhow::Result<Self> {
        let token = match auth {
            Auth::Org => conn
                .api_key
                .as_deref()
                .filter(|k| !k.is_empty())
                .ok_or_else(|| {
                    anyhow!("no API key: pass --api-key or set CORRAL_API_KEY (an org key, ck_...)")
                })?,
            Auth::Admin => conn
                .admin_token
                .as_deref()
                .filter(|k| !k.is_empty())
                .ok_or_else(|| {
                    anyhow!("no admin token: pass --admin-token or set CORRAL_ADMIN_TOKEN")
                })?,
        };
        let base = parse_base_url(&conn.url)?;
        let http = http_client(conn)?;
        Ok(Api {
            http,
            base,
            token: token.to_string(),
        })
    }

    /// `base` + path segments (each percent-encoded) + query pairs.
    fn url(&self, segments: &[&str], query: &[(&str, &str)]) -> Url {
        build_url(&self.base, segments, query)
    }

    async fn call(&self, method: Method, url: Url, body: Option<&Value>) -> anyhow::Result<Value> {
        let mut req = self
            .http
            .request(method, url.clone())
            .bearer_auth(&self.token);
        if let Some(body) = body {
            req = req.json(body);
        }
        let resp = req
            .send()
            .await
            .with_context(|| format!("cannot reach the Corral API at {}", self.base))?;
        let status = resp.status();
        let bytes = resp
            .bytes()
            .await
            .with_context(|| format!("reading the answer to {}", url.path()))?;
        if !status.is_success() {
            return Err(ApiError::from_response(status, &bytes).into());
        }
        if bytes.is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_slice(&bytes).map_err(|e| {
            anyhow!(
                "the server answered HTTP {status} with a body that is not JSON ({e}); is {} the Corral API?",
                self.base
            )
        })
    }

    async fn get(&self, url: Url) -> anyhow::Result<Value> {
        self.call(Method::GET, url, None).await
    }
}

fn parse_base_url(raw: &str) -> anyhow::Result<Url> {
    let url =
        Url::parse(raw.trim()).with_context(|| format!("invalid --url / CORRAL_URL {raw:?}"))?;
    match url.scheme() {
        "http" | "https" => {}
        other => bail!("invalid --url / CORRAL_URL {raw:?}: unsupported scheme {other:?}"),
    }
    if url.cannot_be_a_base() || url.host_str().is_none() {
        bail!("invalid --url / CORRAL_URL {raw:?}: expected http(s)://HOST[:PORT]");
    }
    Ok(url)
}

fn build_url(base: &Url, segments: &[&str], query: &[(&str, &str)]) -> Url {
    let mut url = base.clone();
    url.set_query(None);
    url.set_fragment(None);
    if let Ok(mut path) = url.path_segments_mut() {
        // parse_base_url rules out cannot-be-a-base URLs, so this always runs.
        path.pop_if_empty().extend(segments);
    }
    if !query.is_empty() {
        let mut pairs = url.query_pairs_mut();
        for (k, v) in query {
            pairs.append_pair(k, v);
        }
    }
    url
}

fn wait_param(no_wait: bool) -> &'static str {
    if no_wait {
        "false"
    } else {
        "true"
    }
}

fn to_map(pairs: Vec<(String, String)>) -> BTreeMap<String, String> {
    pairs.into_iter().collect()
}

fn pretty(v: &Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string())
}

/// A string field for display: `-` when missing or null, cleaned otherwise.
fn field(v: &Value, key: &str) -> String {
    match v.get(key) {
        None | Some(Value::Null) => "-".to_string(),
        Some(Value::String(s)) => clean(s),
        Some(other) => clean(&other.to_string()),
    }
}

fn int_field(v: &Value, path: &[&str]) -> Option<i64> {
    let mut cur = v;
    for key in path {
        cur = cur.get(key)?;
    }
    cur.as_i64()
}

fn show_int(n: Option<i64>) -> String {
    n.map_or_else(|| "?".to_string(), |n| n.to_string())
}

/// `2024-05-01T12:34:56.789Z` -> `2024-05-01 12:34:56` (UTC); anything else as is.
fn short_time(v: &Value, key: &str) -> String {
    match v.get(key).and_then(Value::as_str) {
        Some(s) => match chrono::DateTime::parse_from_rfc3339(s) {
            Ok(t) => t
                .with_timezone(&chrono::Utc)
                .format("%Y-%m-%d %H:%M:%S")
                .to_string(),
            Err(_) => clean(s),
        },
        None => "-".to_string(),
    }
}

/// Micros as a decimal amount, e.g. `-1500000` -> `-1.500000`.
fn micros(n: i64) -> String {
    let sign = if n < 0 { "-" } else { "" };
    let abs = n.unsigned_abs();
    format!("{sign}{}.{:06}", abs / 1_000_000, abs % 1_000_000)
}

/// Left-aligned columns separated by two spaces.
pub fn render_table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut text = String::new();
        for (i, cell) in cells.enumerate() {
            if i > 0 {
                text.push_str("  ");
            }
            text.push_str(cell);
            let pad = widths.get(i).copied().unwrap_or(0);
            text.extend(std::iter::repeat_n(
                ' ',
                pad.saturating_sub(cell.chars().count()),
            ));
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(&mut headers.iter().copied());
    for row in rows {
        line(&mut row.iter().map(String::as_str));
    }
    out
}

fn array<'a>(v: &'a Value, key: &str) -> anyhow::Result<&'a Vec<Value>> {
    v.get(key)
        .and_then(Value::as_array)
        .ok_or_else(|| anyhow!("unexpected answer from the server: no {key:?} list"))
}

// ---------------------------------------------------------------------------
// Actor tree
// ---------------------------------------------------------------------------

const MAX_TREE_DEPTH: usize = 64;

/// Renders `{"kind","id"?,"status","children"?}` as an indented tree.
pub fn render_tree(node: &Value) -> String {
    let mut out = String::new();
    out.push_str(&node_label(node));
    out.push('\n');
    render_children(node, "", 1, &mut out);
    out
}

fn node_label(node: &Value) -> String {
    let kind = node
        .get("kind")
        .and_then(Value::as_str)
        .map_or_else(|| "?".to_string(), clean);
    let status = node
        .get("status")
        .and_then(Value::as_str)
        .map_or_else(|| "?".to_string(), clean);
    let status = match node.get("state").and_then(Value::as_str) {
        Some(state) => format!("{status}, {}", clean(state)),
        None => status,
    };
    let mut label = match node.get("id").and_then(Value::as_str) {
        Some(id) => format!("{kind} {} ({status})", clean(id)),
        None => format!("{kind} ({status})"),
    };
    if let Some(org) = node.get("org_id").and_then(Value::as_str) {
        label.push_str(&format!(" org {}", clean(org)));
    }
    if let Some(up) = node.get("uptime_seconds").and_then(Value::as_f64) {
        label.push_str(&format!(" up {}", human_duration(up)));
    }
    match node.get("restarts").and_then(Value::as_u64) {
        Some(n) if n > 0 => label.push_str(&format!(" restarts {n}")),
        _ => {}
    }
    match node.get("mailbox").and_then(Value::as_u64) {
        Some(n) if n > 0 => label.push_str(&format!(" mailbox {n}")),
        _ => {}
    }
    if let Some(error) = node.get("last_error").and_then(Value::as_str) {
        let short: String = error.chars().take(80).collect();
        label.push_str(&format!(" last error: {}", clean(&short)));
    }
    label
}

/// `3d4h`, `2h5m`, `4m12s`, `9s`.
fn human_duration(seconds: f64) -> String {
    let s = if seconds.is_finite() && seconds > 0.0 {
        seconds as u64
    } else {
        0
    };
    let (d, h, m, sec) = (s / 86_400, s / 3600 % 24, s / 60 % 60, s % 60);
    if d > 0 {
        format!("{d}d{h}h")
    } else if h > 0 {
        format!("{h}h{m}m")
    } else if m > 0 {
        format!("{m}m{sec}s")
    } else {
        format!("{sec}s")
    }
}

fn render_children(node: &Value, prefix: &str, depth: usize, out: &mut String) {
    let children: &[Value] = node
        .get("children")
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice);
    if children.is_empty() {
        return;
    }
    if depth > MAX_TREE_DEPTH {
        out.push_str(prefix);
        out.push_str("└── …\n");
        return;
    }
    for (i, child) in children.iter().enumerate() {
        let last = i + 1 == children.len();
        out.push_str(prefix);
        out.push_str(if last { "└── " } else { "├── " });
        out.push_str(&node_label(child));
        out.push('\n');
        let next = format!("{prefix}{}", if last { "    " } else { "│   " });
        render_children(child, &next, depth + 1, out);
    }
}

// ---------------------------------------------------------------------------
// Sandbox commands
// ---------------------------------------------------------------------------

/// Runs one `corral sandbox ...` command.
pub async fn run_sandbox(conn: &Connection, cmd: SandboxCommand) -> anyhow::Result<ExitCode> {
    let api = Api::new(conn, Auth::Org)?;
    match cmd {
        SandboxCommand::Create {
            image,
            name,
            cpu_millis,
            memory_mb,
            ttl_seconds,
            env,
            labels,
            workdir,
            secret_env,
            network,
            read_only_root,
            pids_limit,
            user_namespace,
            no_wait,
            json,
            strategy,
            selector,
            runtime,
            spread_by,
            private_pool_only,
            wait_timeout_ms,
            restart_policy,
            command,
        } => {
            let mut body = json!({
                "image": image,
                "command": command,
                "env": to_map(env),
                "labels": to_map(labels),
            });
            let mut placement = serde_json::Map::new();
            for (key, value) in [
                ("strategy", strategy.map(Value::from)),
                ("runtime", runtime.map(Value::from)),
                ("spread_by", spread_by.map(Value::from)),
                ("wait_timeout_ms", wait_timeout_ms.map(Value::from)),
                (
                    "private_pool_only",
                    private_pool_only.then_some(Value::Bool(true)),
                ),
                (
                    "selector",
                    (!selector.is_empty()).then(|| json!(to_map(selector))),
                ),
            ] {
                if let Some(value) = value {
                    placement.insert(key.to_string(), value);
                }
            }
            if let Value::Object(map) = &mut body {
                if !secret_env.is_empty() {
                    map.insert("secret_env".into(), json!(to_map(secret_env)));
                }
                if read_only_root {
                    map.insert("read_only_root".into(), Value::Bool(true));
                }
                if user_namespace {
                    map.insert("user_namespace".into(), Value::Bool(true));
                }
                if let Some(network) = network {
                    map.insert("network".into(), Value::from(network));
                }
                if let Some(pids) = pids_limit {
                    map.insert("pids_limit".into(), Value::from(pids));
                }
            }
            if let Value::Object(map) = &mut body {
                let optional = [
                    ("name", name.map(Value::from)),
                    ("workdir", workdir.map(Value::from)),
                    ("cpu_millis", cpu_millis.map(Value::from)),
                    ("memory_mb", memory_mb.map(Value::from)),
                    ("ttl_seconds", ttl_seconds.map(Value::from)),
                    ("restart_policy", restart_policy.map(Value::from)),
                    (
                        "placement",
                        (!placement.is_empty()).then_some(Value::Object(placement)),
                    ),
                ];
                for (key, value) in optional {
                    if let Some(value) = value {
                        map.insert(key.to_string(), value);
                    }
                }
            }
            let url = api.url(&["v1", "sandboxes"], &[("wait", wait_param(no_wait))]);
            let sandbox = api.call(Method::POST, url, Some(&body)).await?;
            print_sandbox_outcome(&sandbox, json);
            Ok(ExitCode::SUCCESS)
        }
        SandboxCommand::List {
            state,
            labels,
            limit,
            after,
            json,
        } => list_sandboxes(&api, state, labels, limit, after, json).await,
        SandboxCommand::Get { id, json: _ } => {
            let sandbox = api.get(api.url(&["v1", "sandboxes", &id], &[])).await?;
            println!("{}", pretty(&sandbox));
            Ok(ExitCode::SUCCESS)
        }
        SandboxCommand::Exec {
            id,
            timeout_ms,
            max_output_bytes,
            env,
            workdir,
            argv,
        } => exec(&api, id, timeout_ms, max_output_bytes, env, workdir, argv).await,
        SandboxCommand::Stop { id, no_wait } => {
            let url = api.url(
                &["v1", "sandboxes", &id, "stop"],
                &[("wait", wait_param(no_wait))],
            );
            let sandbox = api.call(Method::POST, url, None).await?;
            print_sandbox_outcome(&sandbox, false);
            Ok(ExitCode::SUCCESS)
        }
        SandboxCommand::Start { id, no_wait } => {
            let url = api.url(
                &["v1", "sandboxes", &id, "start"],
                &[("wait", wait_param(no_wait))],
            );
            let sandbox = api.call(Method::POST, url, None).await?;
            print_sandbox_outcome(&sandbox, false);
            Ok(ExitCode::SUCCESS)
        }
        SandboxCommand::Rm { id, no_wait } => {
            let url = api.url(&["v1", "sandboxes", &id], &[("wait", wait_param(no_wait))]);
            let sandbox = api.call(Method::DELETE, url, None).await?;
            print_sandbox_outcome(&sandbox, false);
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `ID STATE` on stdout (or the whole sandbox as JSON); a failure reason on stderr.
fn print_sandbox_outcome(sandbox: &Value, json: bool) {
    if json {
        println!("{}", pretty(sandbox));
        return;
    }
    println!("{} {}", field(sandbox, "id"), field(sandbox, "state"));
    if let Some(reason) = sandbox.get("failure_reason").and_then(Value::as_str) {
        eprintln!("failure reason: {}", clean(reason));
    }
}

async fn list_sandboxes(
    api: &Api,
    state: Option<String>,
    labels: Vec<(String, String)>,
    limit: Option<u32>,
    after: Option<String>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let label_params: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let limit_param = limit.map(|n| n.to_string());
    let mut cursor = after;
    let mut all: Vec<Value> = Vec::new();
    let mut more: Option<String> = None;
    loop {
        let mut query: Vec<(&str, &str)> = Vec::new();
        if let Some(s) = &state {
            query.push(("state", s));
        }
        for l in &label_params {
            query.push(("label", l));
        }
        if let Some(c) = &cursor {
            query.push(("after", c));
        }
        if let Some(n) = &limit_param {
            query.push(("limit", n));
        }
        let page = api.get(api.url(&["v1", "sandboxes"], &query)).await?;
        all.extend(array(&page, "sandboxes")?.iter().cloned());
        let next = page
            .get("next_cursor")
            .and_then(Value::as_str)
            .filter(|c| !c.is_empty())
            .map(str::to_string);
        match next {
            None => break,
            Some(next) if limit.is_some() => {
                more = Some(next);
                break;
            }
            Some(next) if cursor.as_deref() == Some(next.as_str()) => {
                bail!("the server returned the same page cursor twice ({next:?}); stopping")
            }
            Some(next) => cursor = Some(next),
        }
    }
    if json {
        println!("{}", pretty(&Value::Array(all)));
    } else {
        let rows: Vec<Vec<String>> = all
            .iter()
            .map(|s| {
                vec![
                    field(s, "id"),
                    field(s, "name"),
                    field(s, "image"),
                    field(s, "state"),
                    format!("{}m", show_int(int_field(s, &["cpu_millis"]))),
                    format!("{}Mi", show_int(int_field(s, &["memory_mb"]))),
                    short_time(s, "created_at"),
                ]
            })
            .collect();
        print!(
            "{}",
            render_table(
                &["ID", "NAME", "IMAGE", "STATE", "CPU", "MEM", "CREATED"],
                &rows
            )
        );
    }
    if let Some(next) = more {
        eprintln!("more sandboxes: add --after {}", clean(&next));
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Deserialize)]
struct ExecResult {
    #[serde(default)]
    exit_code: Option<i64>,
    #[serde(default)]
    stdout: String,
    #[serde(default)]
    stderr: String,
    #[serde(default)]
    stdout_truncated: bool,
    #[serde(default)]
    stderr_truncated: bool,
    #[serde(default)]
    timed_out: bool,
}

/// The process exit code for a finished exec: 124 on timeout, otherwise the
/// command's code, with anything outside 0..=255 (a negative code means an
/// abnormal end) reported as 255 rather than as success.
fn exec_exit_code(exit_code: Option<i64>, timed_out: bool) -> u8 {
    if timed_out {
        return 124;
    }
    match exit_code {
        Some(code) => u8::try_from(code).unwrap_or(255),
        None => 255,
    }
}

async fn exec(
    api: &Api,
    id: String,
    timeout_ms: Option<u64>,
    max_output_bytes: Option<u64>,
    env: Vec<(String, String)>,
    workdir: Option<String>,
    argv: Vec<String>,
) -> anyhow::Result<ExitCode> {
    let mut body = serde_json::Map::new();
    body.insert("argv".into(), json!(argv));
    if !env.is_empty() {
        body.insert("env".into(), json!(to_map(env)));
    }
    if let Some(w) = workdir {
        body.insert("workdir".into(), Value::from(w));
    }
    if let Some(t) = timeout_ms {
        body.insert("timeout_ms".into(), Value::from(t));
    }
    if let Some(m) = max_output_bytes {
        body.insert("max_output_bytes".into(), Value::from(m));
    }
    let url = api.url(&["v1", "sandboxes", &id, "exec"], &[]);
    let answer = api
        .call(Method::POST, url, Some(&Value::Object(body)))
        .await?;
    let result: ExecResult =
        serde_json::from_value(answer).context("unexpected answer from the server to exec")?;

    let mut stdout = std::io::stdout().lock();
    stdout.write_all(result.stdout.as_bytes())?;
    stdout.flush()?;
    drop(stdout);

    let mut stderr = std::io::stderr().lock();
    stderr.write_all(result.stderr.as_bytes())?;
    let mut notes = Vec::new();
    if result.stdout_truncated {
        notes.push("[stdout truncated]");
    }
    if result.stderr_truncated {
        notes.push("[stderr truncated]");
    }
    if result.timed_out {
        notes.push("[timed out]");
    }
    if !notes.is_empty() && !result.stderr.is_empty() && !result.stderr.ends_with('\n') {
        stderr.write_all(b"\n")?;
    }
    for note in notes {
        writeln!(stderr, "{note}")?;
    }
    stderr.flush()?;

    Ok(ExitCode::from(exec_exit_code(
        result.exit_code,
        result.timed_out,
    )))
}

// ---------------------------------------------------------------------------
// Admin commands
// ---------------------------------------------------------------------------

/// Runs one `corral admin ...` command.
pub async fn run_admin(conn: &Connection, cmd: AdminCommand) -> anyhow::Result<ExitCode> {
    let api = Api::new(conn, Auth::Admin)?;
    match cmd {
        AdminCommand::Actors {
            json,
            watch,
            kind,
            org,
            host,
        } => {
            let mut query: Vec<(&str, &str)> = Vec::new();
            for (name, value) in [("kind", &kind), ("org_id", &org), ("host_id", &host)] {
                if let Some(value) = value {
                    query.push((name, value));
                }
            }
            let url = api.url(&["v1", "admin", "actors"], &query);
            if let Some(every) = watch {
                watch_actors(&api, url, json, Duration::from_secs(every)).await
            } else {
                let tree = api.get(url).await?;
                print!("{}", show_tree(&tree, json));
                Ok(ExitCode::SUCCESS)
            }
        }
        AdminCommand::CreateOrg { name } => {
            let url = api.url(&["v1", "admin", "orgs"], &[]);
            let answer = api
                .call(Method::POST, url, Some(&json!({ "name": name })))
                .await?;
            let org = answer.get("org").unwrap_or(&Value::Null);
            let secret = answer
                .get("api_key")
                .and_then(|k| k.get("secret"))
                .and_then(Value::as_str)
                .ok_or_else(|| anyhow!("unexpected answer from the server: no API key secret"))?;
            println!("org:     {} ({})", field(org, "id"), field(org, "name"));
            println!("api key: {}", clean(secret));
            println!("The API key is shown only once: store it now (CORRAL_API_KEY).");
            Ok(ExitCode::SUCCESS)
        }
        AdminCommand::Orgs {
            action:
                Some(OrgsCommand::Placement {
                    org_id,
                    private_pool_only,
                    strategy_override,
                }),
        } => {
            let url = api.url(&["v1", "admin", "orgs", &org_id, "placement"], &[]);
            let allow = match strategy_override.as_str() {
                "allow" => Some(true),
                "deny" => Some(false),
                _ => None,
            };
            let body = json!({
                "private_pool_only": private_pool_only,
                "allow_strategy_override": allow,
            });
            let answer = api.call(Method::PUT, url, Some(&body)).await?;
            println!(
                "org {}: private_pool_only = {}, strategy override {}",
                field(&answer, "org_id"),
                field(&answer, "private_pool_only"),
                if answer
                    .get("strategy_override_allowed")
                    .and_then(Value::as_bool)
                    == Some(true)
                {
                    "allowed"
                } else {
                    "not allowed"
                }
            );
            Ok(ExitCode::SUCCESS)
        }
        AdminCommand::Orgs { .. } => {
            let answer = api.get(api.url(&["v1", "admin", "orgs"], &[])).await?;
            let rows: Vec<Vec<String>> = array(&answer, "orgs")?
                .iter()
                .map(|o| {
                    vec![
                        field(o, "id"),
                        field(o, "name"),
                        field(o, "billing_status"),
                        if o.get("private_pool_only").and_then(Value::as_bool) == Some(true) {
                            "private only".to_string()
                        } else {
                            "any".to_string()
                        },
                        short_time(o, "created_at"),
                    ]
                })
                .collect();
            print!(
                "{}",
                render_table(&["ID", "NAME", "BILLING", "POOL", "CREATED"], &rows)
            );
            Ok(ExitCode::SUCCESS)
        }
        AdminCommand::CreateHostToken {
            name,
            host_id,
            org_id,
        } => {
            let mut body = json!({ "name": name });
            if let (Some(h), Value::Object(map)) = (host_id, &mut body) {
                map.insert("host_id".into(), Value::from(h));
            }
            if let (Some(o), Value::Object(map)) = (org_id, &mut body) {
                map.insert("org_id".into(), Value::from(o));
            }
            let url = api.url(&["v1", "admin", "host-tokens"], &[]);
            let answer = api.call(Method::POST, url, Some(&body)).await?;
            let token = answer
                .get("token")
                .and_then(Value::as_str)
                .ok_or_else(|| anyhow!("unexpected answer from the server: no token"))?;
            println!("token id: {}", field(&answer, "id"));
            println!("host id:  {}", field(&answer, "host_id"));
            println!("token:    {}", clean(token));
            println!("The token is shown only once: give it to the host's agent now.");
            Ok(ExitCode::SUCCESS)
        }
        AdminCommand::HostTokens => {
            let answer = api
                .get(api.url(&["v1", "admin", "host-tokens"], &[]))
                .await?;
            let rows: Vec<Vec<String>> = array(&answer, "host_tokens")?
                .iter()
                .map(|t| {
                    vec![
                        field(t, "id"),
                        field(t, "name"),
                        field(t, "host_id"),
                        field(t, "prefix"),
                        short_time(t, "created_at"),
                        short_time(t, "revoked_at"),
                    ]
                })
                .collect();
            print!(
                "{}",
                render_table(
                    &["ID", "NAME", "HOST", "PREFIX", "CREATED", "REVOKED"],
                    &rows
                )
            );
            Ok(ExitCode::SUCCESS)
        }
        AdminCommand::RevokeHostToken { id } => {
            let url = api.url(&["v1", "admin", "host-tokens", &id], &[]);
            let token = api.call(Method::DELETE, url, None).await?;
            println!(
                "revoked {} (host {}) at {}",
                field(&token, "id"),
                field(&token, "host_id"),
                short_time(&token, "revoked_at")
            );
            Ok(ExitCode::SUCCESS)
        }
        AdminCommand::Hosts {
            action: Some(HostsCommand::Get { id }),
        } => {
            let answer = api
                .get(api.url(&["v1", "admin", "hosts", &id], &[]))
                .await?;
            println!("{}", serde_json::to_string_pretty(&answer)?);
            Ok(ExitCode::SUCCESS)
        }
        AdminCommand::Hosts {
            action:
                Some(
                    action @ (HostsCommand::Cordon { .. }
                    | HostsCommand::Uncordon { .. }
                    | HostsCommand::Drain { .. }
                    | HostsCommand::Decommission { .. }),
                ),
        } => {
            let (verb, id) = match &action {
                HostsCommand::Cordon { id } => ("cordon", id),
                HostsCommand::Uncordon { id } => ("uncordon", id),
                HostsCommand::Drain { id, .. } => ("drain", id),
                HostsCommand::Decommission { id } => ("decommission", id),
                HostsCommand::List | HostsCommand::Get { .. } => {
                    return Err(anyhow!("unreachable host command"))
                }
            };
            let deadline = match &action {
                HostsCommand::Drain {
                    deadline_seconds: Some(n),
                    ..
                } => Some(n.to_string()),
                _ => None,
            };
            let query: Vec<(&str, &str)> = deadline
                .as_deref()
                .map(|n| ("deadline_seconds", n))
                .into_iter()
                .collect();
            let url = api.url(&["v1", "admin", "hosts", id, verb], &query);
            let host = api.call(Method::POST, url, Some(&json!({}))).await?;
            println!(
                "host {}: {} ({}), {} sandbox(es)",
                field(&host, "id"),
                field(&host, "admin_state"),
                field(&host, "state"),
                show_int(int_field(&host, &["sandbox_count"]))
            );
            Ok(ExitCode::SUCCESS)
        }
        AdminCommand::Hosts { .. } => {
            let answer = api.get(api.url(&["v1", "admin", "hosts"], &[])).await?;
            let rows: Vec<Vec<String>> = array(&answer, "hosts")?
                .iter()
                .map(|h| {
                    let runtime = match h.get("isolated").and_then(Value::as_bool) {
                        Some(false) => format!("{} (not isolated)", field(h, "runtime")),
                        _ => field(h, "runtime"),
                    };
                    vec![
                        field(h, "id"),
                        field(h, "hostname"),
                        field(h, "state"),
                        field(h, "admin_state"),
                        runtime,
                        format!(
                            "{}m/{}m",
                            show_int(int_field(h, &["allocated", "cpu_millis"])),
                            show_int(int_field(h, &["allocatable", "cpu_millis"]))
                        ),
                        format!(
                            "{}Mi/{}Mi",
                            show_int(int_field(h, &["allocated", "memory_mb"])),
                            show_int(int_field(h, &["allocatable", "memory_mb"]))
                        ),
                        show_int(int_field(h, &["sandbox_count"])),
                        labels_text(h),
                    ]
                })
                .collect();
            print!(
                "{}",
                render_table(
                    &[
                        "ID",
                        "HOSTNAME",
                        "STATE",
                        "ADMIN",
                        "RUNTIME",
                        "CPU",
                        "MEM",
                        "SANDBOXES",
                        "LABELS"
                    ],
                    &rows
                )
            );
            Ok(ExitCode::SUCCESS)
        }
        AdminCommand::OrgBilling { org_id } => {
            let url = api.url(&["v1", "admin", "orgs", &org_id, "billing"], &[]);
            print!(
                "{}",
                billing_summary(&api.call(Method::GET, url, None).await?)
            );
            Ok(ExitCode::SUCCESS)
        }
        AdminCommand::SetBilling {
            org_id,
            plan,
            exempt,
            max_sandboxes,
            max_cpu_millis,
            max_memory_mb,
            max_ttl_seconds,
        } => {
            let mut body = serde_json::Map::new();
            if let Some(plan) = plan {
                body.insert("plan".into(), Value::from(plan));
            }
            if let Some(exempt) = exempt {
                body.insert("exempt".into(), Value::from(exempt));
            }
            let limits = [
                max_sandboxes,
                max_cpu_millis,
                max_memory_mb,
                max_ttl_seconds,
            ];
            if limits.iter().any(Option::is_some) {
                body.insert(
                    "quota".into(),
                    json!({
                        "max_sandboxes": max_sandboxes,
                        "max_cpu_millis": max_cpu_millis,
                        "max_memory_mb": max_memory_mb,
                        "max_ttl_seconds": max_ttl_seconds,
                    }),
                );
            }
            let url = api.url(&["v1", "admin", "orgs", &org_id, "billing"], &[]);
            let answer = api
                .call(Method::PUT, url, Some(&Value::Object(body)))
                .await?;
            print!("{}", billing_summary(&answer));
            Ok(ExitCode::SUCCESS)
        }
        AdminCommand::Plans => {
            let answer = api
                .call(Method::GET, api.url(&["v1", "admin", "plans"], &[]), None)
                .await?;
            let rows: Vec<Vec<String>> = answer["plans"]
                .as_array()
                .map(|plans| {
                    plans
                        .iter()
                        .map(|p| {
                            vec![
                                field(p, "name"),
                                int_field(p, &["cpu_micros_per_vcpu_hour"])
                                    .map_or("?".into(), micros),
                                int_field(p, &["memory_micros_per_gib_hour"])
                                    .map_or("?".into(), micros),
                                int_field(p, &["stopped_memory_micros_per_gib_hour"])
                                    .map_or("?".into(), micros),
                            ]
                        })
                        .collect()
                })
                .unwrap_or_default();
            print!(
                "{}",
                render_table(
                    &["NAME", "VCPU-HOUR", "GIB-HOUR", "STOPPED GIB-HOUR"],
                    &rows
                )
            );
            Ok(ExitCode::SUCCESS)
        }
        AdminCommand::CreatePlan {
            name,
            cpu_micros_per_vcpu_hour,
            memory_micros_per_gib_hour,
            stopped_memory_micros_per_gib_hour,
        } => {
            let body = json!({
                "name": name,
                "cpu_micros_per_vcpu_hour": cpu_micros_per_vcpu_hour,
                "memory_micros_per_gib_hour": memory_micros_per_gib_hour,
                "stopped_memory_micros_per_gib_hour": stopped_memory_micros_per_gib_hour,
            });
            let answer = api
                .call(
                    Method::POST,
                    api.url(&["v1", "admin", "plans"], &[]),
                    Some(&body),
                )
                .await?;
            println!("plan {} ({})", field(&answer, "name"), field(&answer, "id"));
            Ok(ExitCode::SUCCESS)
        }
        AdminCommand::BillingAudit => {
            let answer = api
                .call(
                    Method::GET,
                    api.url(&["v1", "admin", "billing", "audit"], &[]),
                    None,
                )
                .await?;
            println!("{}", pretty(&answer));
            Ok(if answer["ok"] == Value::Bool(true) {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        AdminCommand::Credits {
            org_id,
            kind,
            amount_micros,
            reference,
            description,
        } => {
            let mut body =
                json!({ "kind": kind, "amount_micros": amount_micros, "reference": reference });
            if let (Some(d), Value::Object(map)) = (description, &mut body) {
                map.insert("description".into(), Value::from(d));
            }
            let url = api.url(&["v1", "admin", "orgs", &org_id, "credits"], &[]);
            let answer = api.call(Method::POST, url, Some(&body)).await?;
            let balance = int_field(&answer, &["balance_micros"]).map_or_else(
                || "?".to_string(),
                |b| format!("{} ({b} micros)", micros(b)),
            );
            println!(
                "org {}: balance {balance}, status {}",
                field(&answer, "org_id"),
                field(&answer, "status")
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn show_tree(tree: &Value, json: bool) -> String {
    if json {
        format!("{}\n", pretty(tree))
    } else {
        render_tree(tree)
    }
}

async fn watch_actors(
    api: &Api,
    url: Url,
    json: bool,
    every: Duration,
) -> anyhow::Result<ExitCode> {
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        let shown = tokio::select! {
            _ = &mut ctrl_c => break,
            answer = api.get(url.clone()) => match answer {
                Ok(tree) => show_tree(&tree, json),
                Err(err) => format!("error: {err:#}\n"),
            },
        };
        let now = chrono::Local::now().format("%H:%M:%S");
        print!("\x1b[2J\x1b[H");
        println!(
            "Every {}s: {url}  {now}  (Ctrl-C to quit)\n",
            every.as_secs()
        );
        print!("{shown}");
        let _ = std::io::stdout().flush();
        tokio::select! {
            _ = &mut ctrl_c => break,
            _ = tokio::time::sleep(every) => {}
        }
    }
    println!();
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use clap::{CommandFactory, Parser};

    #[test]
    fn key_value_parsing() {
        assert_eq!(
            parse_key_value("A=b"),
            Ok(("A".to_string(), "b".to_string()))
        );
        assert_eq!(
            parse_key_value("A=b=c"),
            Ok(("A".to_string(), "b=c".to_string()))
        );
        assert_eq!(
            parse_key_value("EMPTY="),
            Ok(("EMPTY".to_string(), String::new()))
        );
        assert!(parse_key_value("novalue").is_err());
        assert!(parse_key_value("=v").is_err());
        assert!(parse_key_value("").is_err());
    }

    #[test]
    fn tree_rendering() {
        let tree = json!({
            "kind": "root", "status": "running",
            "children": [
                {"kind": "fleet", "status": "running", "children": [
                    {"kind": "host", "id": "hst_1", "status": "running", "children": [
                        {"kind": "connection", "id": "hst_1#1", "status": "running"},
                        {"kind": "sandbox", "id": "sbx_1", "status": "running", "children": []}
                    ]}
                ]},
                {"kind": "orgs", "status": "running"},
                {"kind": "scheduler", "status": "running"}
            ]
        });
        let expected = "\
root (running)
├── fleet (running)
│   └── host hst_1 (running)
│       ├── connection hst_1#1 (running)
│       └── sandbox sbx_1 (running)
├── orgs (running)
└── scheduler (running)
";
        assert_eq!(render_tree(&tree), expected);
    }

    #[test]
    fn tree_labels_show_what_the_registry_knows() {
        let tree = json!({"kind": "sandbox", "id": "sbx_1", "status": "running",
            "org_id": "org_1", "uptime_seconds": 125.4, "restarts": 2,
            "mailbox": 7, "last_error": "boom"});
        assert_eq!(
            render_tree(&tree),
            "sandbox sbx_1 (running) org org_1 up 2m5s restarts 2 mailbox 7 last error: boom\n"
        );
    }

    #[test]
    fn tree_rendering_is_tolerant() {
        assert_eq!(render_tree(&json!({})), "? (?)\n");
        assert_eq!(
            render_tree(&json!({"kind": "x\u{1b}[2J", "status": "ok", "children": "nope"})),
            "x?[2J (ok)\n"
        );
        // A very deep tree (serde_json parses at most 128 levels) is cut off.
        let mut deep = json!({"kind": "leaf", "status": "running"});
        for _ in 0..120 {
            deep = json!({"kind": "n", "status": "running", "children": [deep]});
        }
        let out = render_tree(&deep);
        assert!(out.contains('…'));
        assert!(out.lines().count() <= MAX_TREE_DEPTH + 3);
    }

    #[test]
    fn error_body_formatting() {
        let body = br#"{"error":{"code":"no_capacity","message":"no host has room"}}"#;
        let err = ApiError::from_response(StatusCode::SERVICE_UNAVAILABLE, body);
        assert_eq!(err.to_string(), "no host has room (no_capacity)");
        assert_eq!(err.status, 503);
        assert_eq!(err.code.as_deref(), Some("no_capacity"));

        let err = ApiError::from_response(StatusCode::BAD_GATEWAY, b"<html>oops</html>");
        assert_eq!(err.to_string(), "the server answered HTTP 502 Bad Gateway");
        assert_eq!(err.code, None);

        let err = ApiError::from_response(StatusCode::NOT_FOUND, br#"{"error":"nope"}"#);
        assert_eq!(err.to_string(), "the server answered HTTP 404 Not Found");

        let body = br#"{"error":{"code":"x","message":"line1\nline2","extra":1},"more":true}"#;
        let err = ApiError::from_response(StatusCode::BAD_REQUEST, body);
        assert_eq!(err.to_string(), "line1?line2 (x)");

        // What main prints: `error: {err:#}`.
        let err: anyhow::Error = ApiError::from_response(
            StatusCode::CONFLICT,
            br#"{"error":{"code":"invalid_state","message":"sandbox is stopped"}}"#,
        )
        .into();
        assert_eq!(
            format!("error: {err:#}"),
            "error: sandbox is stopped (invalid_state)"
        );
    }

    #[test]
    fn exit_codes() {
        assert_eq!(exec_exit_code(Some(0), false), 0);
        assert_eq!(exec_exit_code(Some(3), false), 3);
        assert_eq!(exec_exit_code(Some(255), false), 255);
        assert_eq!(exec_exit_code(Some(256), false), 255);
        assert_eq!(exec_exit_code(Some(-9), false), 255);
        assert_eq!(exec_exit_code(None, false), 255);
        assert_eq!(exec_exit_code(Some(0), true), 124);
        assert_eq!(exec_exit_code(Some(137), true), 124);
    }

    #[test]
    fn urls() {
        let base = parse_base_url("http://127.0.0.1:7070").unwrap();
        let url = build_url(
            &base,
            &["v1", "sandboxes"],
            &[("label", "team=a b&c"), ("wait", "true")],
        );
        assert_eq!(
            url.as_str(),
            "http://127.0.0.1:7070/v1/sandboxes?label=team%3Da+b%26c&wait=true"
        );
        let base = parse_base_url("http://example.com/corral/").unwrap();
        let url = build_url(&base, &["v1", "sandboxes", "a/b?c"], &[]);
        assert_eq!(
            url.as_str(),
            "http://example.com/corral/v1/sandboxes/a%2Fb%3Fc"
        );
        assert!(parse_base_url("https://example.com").is_ok());
        assert!(parse_base_url("ftp://example.com").is_err());
        assert!(parse_base_url("not a url").is_err());
    }

    #[test]
    fn tables_and_amounts() {
        let out = render_table(
            &["ID", "NAME"],
            &[
                vec!["sbx_1".into(), "-".into()],
                vec!["s".into(), "long-name".into()],
            ],
        );
        assert_eq!(out, "ID     NAME\nsbx_1  -\ns      long-name\n");
        assert_eq!(micros(1_500_000), "1.500000");
        assert_eq!(micros(-42), "-0.000042");
        assert_eq!(micros(i64::MIN), "-9223372036854.775808");
    }

    #[derive(Parser, Debug)]
    struct TestCli {
        #[command(flatten)]
        connection: Connection,
        #[command(subcommand)]
        command: TestCommand,
    }

    #[derive(clap::Subcommand, Debug)]
    #[allow(clippy::large_enum_variant)]
    enum TestCommand {
        #[command(subcommand)]
        Sandbox(SandboxCommand),
        #[command(subcommand)]
        Admin(AdminCommand),
    }

    #[test]
    fn cli_definition_is_valid() {
        TestCli::command().debug_assert();
    }

    #[test]
    fn create_takes_the_command_after_options() {
        let cli = TestCli::try_parse_from([
            "corral", "sandbox", "create", "busybox", "--name", "hello", "--env", "A=1=2",
            "--label", "team=x", "--", "sh", "-c", "echo hi",
        ])
        .unwrap();
        match cli.command {
            TestCommand::Sandbox(SandboxCommand::Create {
                image,
                name,
                env,
                labels,
                command,
                ..
            }) => {
                assert_eq!(image, "busybox");
                assert_eq!(name.as_deref(), Some("hello"));
                assert_eq!(env, vec![("A".to_string(), "1=2".to_string())]);
                assert_eq!(labels, vec![("team".to_string(), "x".to_string())]);
                assert_eq!(command, vec!["sh", "-c", "echo hi"]);
            }
            other => panic!("unexpected {other:?}"),
        }
        // The command is required, and K=V needs '='.
        assert!(TestCli::try_parse_from(["corral", "sandbox", "create", "busybox"]).is_err());
        assert!(TestCli::try_parse_from([
            "corral", "sandbox", "create", "busybox", "--env", "NOPE", "--", "true"
        ])
        .is_err());
    }

    #[test]
    fn exec_and_global_flags() {
        let cli = TestCli::try_parse_from([
            "corral",
            "sandbox",
            "exec",
            "sbx_1",
            "--timeout-ms",
            "500",
            "--url",
            "http://h:1",
            "--",
            "ls",
            "-la",
        ])
        .unwrap();
        assert_eq!(cli.connection.url, "http://h:1");
        match cli.command {
            TestCommand::Sandbox(SandboxCommand::Exec {
                id,
                timeout_ms,
                argv,
                ..
            }) => {
                assert_eq!(id, "sbx_1");
                assert_eq!(timeout_ms, Some(500));
                assert_eq!(argv, vec!["ls", "-la"]);
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn missing_credentials_are_explained() {
        let conn = Connection {
            url: "http://127.0.0.1:7070".into(),
            api_key: None,
            admin_token: Some(String::new()),
            ca_cert: None,
            client_cert: None,
            client_key: None,
        };
        let err = Api::new(&conn, Auth::Org).err().map(|e| e.to_string());
        assert!(err.is_some_and(|e| e.contains("CORRAL_API_KEY") && e.contains("--api-key")));
        let err = Api::new(&conn, Auth::Admin).err().map(|e| e.to_string());
        assert!(err.is_some_and(|e| e.contains("CORRAL_ADMIN_TOKEN")));
    }
}
