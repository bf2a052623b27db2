//! Observability end to end: one trace across the control plane and the
//! agent (separate processes, exported over OTLP to a receiver this test
//! runs), Prometheus metrics of both that parse and move, JSON logs that
//! carry the request's trace and span ids, the actor tree against the hosts
//! and sandboxes that exist (also after a restart) and with the messages
//! waiting in a busy actor's mailbox, and the org-scoped SSE event stream.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use corral_agent::fake::FakeConfig;
use corral_tests::{
    binary, create_sandbox, free_port, id_of, wait_for, Api, ChildProcess, TestServer, ADMIN_TOKEN,
    TEST_CREDITS_MICROS,
};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::Span as OtlpSpan;
use reqwest::StatusCode;
use serde_json::{json, Value};
use tokio::io::AsyncBufReadExt;

const DEADLINE: Duration = Duration::from_secs(30);

fn small(name: &str) -> Value {
    json!({
        "image": "busybox",
        "command": ["sleep", "600"],
        "name": name,
        "cpu_millis": 500,
        "memory_mb": 256,
    })
}

// ---- an OTLP receiver ---------------------------------------------------

#[derive(Debug, Clone)]
struct Collected {
    service: String,
    span: OtlpSpan,
}

#[derive(Clone, Default)]
struct Collector(Arc<Mutex<Vec<Collected>>>);

impl Collector {
    fn spans(&self) -> Vec<Collected> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut out = Vec::new();
        for resource_spans in request.into_inner().resource_spans {
            let service = resource_spans
                .resource
                .as_ref()
                .and_then(|r| r.attributes.iter().find(|a| a.key == "service.name"))
                .and_then(|a| a.value.as_ref())
                .and_then(|v| match &v.value {
                    Some(AnyValue::StringValue(s)) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for scope in resource_spans.scope_spans {
                for span in scope.spans {
                    out.push(Collected {
                        service: service.clone(),
                        span,
                    });
                }
            }
        }
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .extend(out);
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

async fn start_collector() -> (Collector, SocketAddr) {
    let collector = Collector::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the OTLP receiver");
    let addr = listener.local_addr().expect("receiver address");
    let service = TraceServiceServer::new(collector.clone());
    tokio::spawn(async move {
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        let _ = tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(incoming)
            .await;
    });
    (collector, addr)
}

fn attribute(span: &OtlpSpan, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|a| a.key == key)
        .and_then(|a| a.value.as_ref())
        .and_then(|v| match &v.value {
            Some(AnyValue::StringValue(s)) => Some(s.clone()),
            Some(AnyValue::IntValue(i)) => Some(i.to_string()),
            _ => None,
        })
}

// ---- the stack as processes ---------------------------------------------

struct Processes {
    dir: tempfile::TempDir,
    admin: Api,
    api: Api,
    org_id: String,
    host_id: String,
    base: String,
    agent_metrics: String,
    server: ChildProcess,
    agent: Option<ChildProcess>,
}

/// `corral server` and a `corral-agent` on the fake runtime, both with
/// `env` (the OTLP endpoint, say), the server's stderr captured as JSON
/// lines in `dir/server.log`.
async fn start_processes(env: &[(&str, String)]) -> Processes {
    let dir = tempfile::tempdir().expect("a temp dir");
    let (http_port, grpc_port, metrics_port) = (free_port(), free_port(), free_port());
    let base = format!("http://127.0.0.1:{http_port}");
    let log = std::fs::File::create(dir.path().join("server.log")).expect("a log file");
    let server = ChildProcess::spawn(
        "corral server",
        tokio::process::Command::new(binary("corral"))
            .arg("server")
            .arg("--http-addr")
            .arg(format!("127.0.0.1:{http_port}"))
            .arg("--grpc-addr")
            .arg(format!("127.0.0.1:{grpc_port}"))
            .arg("--data-dir")
            .arg(dir.path().join("cp"))
            .arg("--heartbeat-ms")
            .arg("500")
            .arg("--log-format")
            .arg("json")
            .env("CORRAL_ADMIN_TOKEN", ADMIN_TOKEN)
            .env("RUST_LOG", "info")
            .env_remove("DATABASE_URL")
            .envs(env.iter().map(|(k, v)| (k.to_string(), v.clone())))
            .stderr(Stdio::from(log)),
    );
    corral_tests::wait_ready(&base, DEADLINE).await;
    let admin = Api::new(&base, ADMIN_TOKEN);
    let (status, org) = admin
        .post(
            "/v1/admin/orgs",
            json!({"name": "obs", "credits_micros": TEST_CREDITS_MICROS}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{org}");
    let api = Api::new(&base, org["api_key"]["secret"].as_str().expect("key"));
    let org_id = org["org"]["id"].as_str().expect("org id").to_string();
    let (status, token) = admin
        .post("/v1/admin/host-tokens", json!({"name": "obs-host"}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{token}");
    let host_id = token["host_id"].as_str().expect("host id").to_string();
    let agent = ChildProcess::spawn(
        "corral-agent",
        tokio::process::Command::new(binary("corral-agent"))
            .arg("run")
            .arg("--control-plane")
            .arg(format!("http://127.0.0.1:{grpc_port}"))
            .arg("--token")
            .arg(token["token"].as_str().expect("token"))
            .arg("--data-dir")
            .arg(dir.path().join("agent"))
            .arg("--runtime")
            .arg("fake")
            .arg("--cpus")
            .arg("8")
            .arg("--memory-mb")
            .arg("8192")
            .arg("--metrics-addr")
            .arg(format!("127.0.0.1:{metrics_port}"))
            .envs(env.iter().map(|(k, v)| (k.to_string(), v.clone())))
            .stderr(Stdio::null()),
    );
    let processes = Processes {
        dir,
        admin,
        api,
        org_id,
        host_id,
        base,
        agent_metrics: format!("http://127.0.0.1:{metrics_port}/metrics"),
        server,
        agent: Some(agent),
    };
    let admin = processes.admin.clone();
    let host_id = processes.host_id.clone();
    wait_for("the host to be ready", DEADLINE, || {
        let admin = admin.clone();
        let host_id = host_id.clone();
        async move {
            let (_, hosts) = admin.get("/v1/admin/hosts").await;
            hosts["hosts"]
                .as_array()?
                .iter()
                .any(|h| h["id"] == host_id.as_str() && h["state"] == "ready")
                .then_some(())
        }
    })
    .await;
    processes
}

impl Processes {
    async fn stop(mut self) {
        if let Some(mut agent) = self.agent.take() {
            agent.kill().await;
        }
        self.server.kill().await;
    }
}

// ---- traces -------------------------------------------------------------

#[tokio::test]
async fn one_sandbox_create_is_one_trace_across_control_plane_and_agent() {
    let (collector, addr) = start_collector().await;
    let otel = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{addr}")),
        ("OTEL_BSP_SCHEDULE_DELAY", "100".to_string()),
    ];
    let stack = start_processes(&otel).await;

    // The caller's own trace: everything must continue it.
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let response = corral_tests::http_client()
        .post(format!("{}/v1/sandboxes", stack.base))
        .bearer_auth(&stack.api.token)
        .header("traceparent", format!("00-{trace_id}-00f067aa0ba902b7-01"))
        .json(&small("traced"))
        .send()
        .await
        .expect("the create answers");
    assert_eq!(response.status(), StatusCode::CREATED);
    let created: Value = response.json().await.expect("a JSON body");
    assert_eq!(created["state"], "running", "{created}");
    let sandbox_id = id_of(&created);

    let by_name = |spans: &[Collected], service: &str, name: &str| -> Option<OtlpSpan> {
        spans
            .iter()
            .find(|c| {
                c.service == service && c.span.name == name && hex(&c.span.trace_id) == trace_id
            })
            .map(|c| c.span.clone())
    };
    let method = "corral.agent.v1.AgentService/CreateSandbox";
    let spans = wait_for("the spans of both processes", DEADLINE, || {
        let spans = collector.spans();
        let complete = by_name(&spans, "corral-control-plane", "POST /v1/sandboxes").is_some()
            && by_name(&spans, "corral-control-plane", method).is_some()
            && by_name(&spans, "corral-agent", method).is_some()
            && by_name(&spans, "corral-agent", "runtime create").is_some();
        async move { complete.then_some(spans) }
    })
    .await;

    let http = by_name(&spans, "corral-control-plane", "POST /v1/sandboxes").expect("http");
    let create = by_name(&spans, "corral-control-plane", "sandbox.create").expect("create");
    let step = by_name(&spans, "corral-control-plane", "sandbox.step").expect("step");
    let client = by_name(&spans, "corral-control-plane", method).expect("client");
    let server = by_name(&spans, "corral-agent", method).expect("agent");
    let runtime = by_name(&spans, "corral-agent", "runtime create").expect("runtime");

    // One trace, the caller's, with each span the child of the one before.
    assert_eq!(hex(&http.parent_span_id), "00f067aa0ba902b7");
    assert_eq!(create.parent_span_id, http.span_id);
    assert_eq!(step.parent_span_id, create.span_id);
    assert_eq!(client.parent_span_id, step.span_id);
    assert_eq!(
        server.parent_span_id, client.span_id,
        "the agent continues the trace"
    );
    assert_eq!(runtime.parent_span_id, server.span_id);

    // Attributes by the semantic conventions, ids where they belong.
    assert_eq!(
        attribute(&http, "http.route").as_deref(),
        Some("/v1/sandboxes")
    );
    assert_eq!(
        attribute(&http, "http.response.status_code").as_deref(),
        Some("201")
    );
    assert_eq!(
        attribute(&create, "org.id").as_deref(),
        Some(stack.org_id.as_str())
    );
    assert_eq!(
        attribute(&create, "sandbox.id").as_deref(),
        Some(sandbox_id.as_str())
    );
    assert_eq!(
        attribute(&create, "host.id").as_deref(),
        Some(stack.host_id.as_str())
    );
    assert_eq!(attribute(&server, "rpc.system").as_deref(), Some("grpc"));
    assert_eq!(
        attribute(&server, "host.id").as_deref(),
        Some(stack.host_id.as_str())
    );
    assert_eq!(
        attribute(&server, "sandbox.id").as_deref(),
        Some(sandbox_id.as_str())
    );

    // An error marks its span as failed: an exec on a missing sandbox is a
    // 404 (not a server error), a create the fake cannot run fails its step.
    let (status, _) = stack
        .api
        .post(
            "/v1/sandboxes",
            json!({"image": "no-such-image", "command": ["true"], "memory_mb": 64}),
        )
        .await;
    assert!(status.is_client_error() || status.is_success(), "{status}");
    wait_for("a failed span", DEADLINE, || {
        let failed = collector.spans().into_iter().any(|c| {
            c.service == "corral-agent"
                && c.span.name == method
                && c.span.status.as_ref().is_some_and(|s| s.code == 2)
        });
        async move { failed.then_some(()) }
    })
    .await;
    stack.stop().await;
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

// ---- metrics ------------------------------------------------------------

/// Parses the Prometheus text format strictly enough to catch a broken
/// exposition: every sample line is `name{labels} value` with a numeric
/// value, and every family has a TYPE. Returns the samples by their full
/// `name{labels}` key.
fn parse_prometheus(text: &str) -> HashMap<String, f64> {
    let mut typed = std::collections::HashSet::new();
    let mut samples = HashMap::new();
    for line in text.lines() {
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            let name = parts.next().expect("a family name");
            let kind = parts.next().expect("a type");
            assert!(
                ["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind),
                "bad type in {line:?}"
            );
            typed.insert(name.to_string());
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        let (key, value) = line.rsplit_once(' ').expect("a sample has a value");
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("non-numeric value in {line:?}"));
        let name = key.split('{').next().expect("a name");
        assert!(
            name.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "bad metric name in {line:?}"
        );
        if key.contains('{') {
            assert!(key.ends_with('}'), "unterminated labels in {line:?}");
        }
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s).filter(|f| typed.contains(*f)))
            .unwrap_or(name);
        assert!(typed.contains(family), "no TYPE for {line:?}");
        samples.insert(key.to_string(), value);
    }
    samples
}

async fn scrape(url: &str) -> HashMap<String, f64> {
    let response = corral_tests::http_client()
        .get(url)
        .send()
        .await
        .expect("metrics answer");
    assert_eq!(response.status(), StatusCode::OK);
    assert!(response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/plain; version=0.0.4")));
    parse_prometheus(&response.text().await.expect("a body"))
}

#[tokio::test]
async fn metrics_of_control_plane_and_agent_parse_and_move() {
    let stack = start_processes(&[]).await;
    let cp_url = format!("{}/metrics", stack.base);
    let creates = r#"corral_http_request_duration_seconds_count{route="/v1/sandboxes",method="POST",status="201"}"#;
    let agent_creates = r#"corral_agent_commands_total{command="create",outcome="ok"}"#;
    // The control plane has the host ready as soon as it registered; the
    // agent sets its gauge when the acknowledgement reaches it.
    let agent_before = wait_for("the agent to say it is connected", DEADLINE, || {
        let url = stack.agent_metrics.clone();
        async move {
            let metrics = scrape(&url).await;
            (metrics.get("corral_agent_connected") == Some(&1.0)).then_some(metrics)
        }
    })
    .await;
    let before = scrape(&cp_url).await;

    let id = id_of(&create_sandbox(&stack.api, small("counted")).await);
    let after = scrape(&cp_url).await;
    let agent_after = scrape(&stack.agent_metrics).await;
    let get = |m: &HashMap<String, f64>, k: &str| m.get(k).copied().unwrap_or(0.0);
    assert_eq!(get(&after, creates), get(&before, creates) + 1.0);
    assert!(get(&after, r#"corral_sandboxes{state="running"}"#) >= 1.0);
    assert_eq!(get(&after, r#"corral_hosts{state="ready"}"#), 1.0);
    assert_eq!(get(&after, "corral_agent_streams_open"), 1.0);
    assert!(get(&after, r#"corral_actors{kind="sandbox"}"#) >= 1.0);
    assert!(get(&after, "corral_placement_seconds_count{outcome=\"placed\"}") >= 1.0);
    assert!(get(&after, "corral_sandbox_create_to_running_seconds_count") >= 1.0);
    let balance = format!("corral_ledger_balance_micros{{org=\"{}\"}}", stack.org_id);
    assert!(after.contains_key(&balance), "no balance for the org");
    assert_eq!(
        get(&agent_after, agent_creates),
        get(&agent_before, agent_creates) + 1.0
    );
    assert!(
        get(
            &agent_after,
            r#"corral_agent_command_duration_seconds_count{command="create"}"#
        ) >= 1.0
    );

    let (status, _) = stack.api.delete(&format!("/v1/sandboxes/{id}")).await;
    assert!(status.is_success(), "{status}");
    let agent_end = scrape(&stack.agent_metrics).await;
    assert!(
        get(
            &agent_end,
            r#"corral_agent_commands_total{command="destroy",outcome="ok"}"#
        ) >= 1.0
    );
    stack.stop().await;
}

// ---- logs ---------------------------------------------------------------

#[tokio::test]
async fn json_logs_carry_the_requests_trace_and_span_ids() {
    let stack = start_processes(&[]).await;
    let trace_id = "0af7651916cd43dd8448eb211c80319c";
    let response = corral_tests::http_client()
        .get(format!("{}/v1/sandboxes", stack.base))
        .bearer_auth(&stack.api.token)
        .header("traceparent", format!("00-{trace_id}-b7ad6b7169203331-01"))
        .send()
        .await
        .expect("an answer");
    assert_eq!(response.status(), StatusCode::OK);
    let log = stack.dir.path().join("server.log");
    let line = wait_for("the request's log line", DEADLINE, || {
        let log = log.clone();
        async move {
            let file = tokio::fs::File::open(&log).await.ok()?;
            let mut lines = tokio::io::BufReader::new(file).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let value: Value = serde_json::from_str(&line)
                    .unwrap_or_else(|_| panic!("a log line that is not JSON: {line}"));
                if value["fields"]["message"] == "request served"
                    && value["span"]["trace_id"] == trace_id
                {
                    return Some(value);
                }
            }
            None
        }
    })
    .await;
    assert_eq!(line["span"]["http.route"], "/v1/sandboxes");
    assert_eq!(line["level"], "INFO");
    let span_id = line["span"]["span_id"].as_str().expect("a span id");
    assert_eq!(span_id.len(), 16);
    assert!(span_id.bytes().all(|b| b.is_ascii_hexdigit()));
    assert_ne!(span_id, "b7ad6b7169203331", "a span of its own");
    stack.stop().await;
}

// ---- the actor tree -----------------------------------------------------

fn collect(node: &Value, kind: &str, out: &mut Vec<Value>) {
    if node["kind"] == kind {
        out.push(node.clone());
    }
    for child in node["children"].as_array().into_iter().flatten() {
        collect(child, kind, out);
    }
}

async fn tree_of(api: &Api, query: &str) -> Value {
    let (status, tree) = api.get(&format!("/v1/admin/actors{query}")).await;
    assert_eq!(status, StatusCode::OK, "{tree}");
    tree
}

fn ids(tree: &Value, kind: &str) -> Vec<String> {
    let mut nodes = Vec::new();
    collect(tree, kind, &mut nodes);
    let mut ids: Vec<String> = nodes
        .iter()
        .filter_map(|n| n["id"].as_str().map(str::to_string))
        .collect();
    ids.sort();
    ids
}

#[tokio::test]
async fn the_actor_tree_matches_hosts_and_sandboxes_also_after_a_restart() {
    let cp = TestServer::start().await;
    let agent = cp.fake_agent(8000, 8192, FakeConfig::default()).await;
    let (org_a, api_a) = cp.create_org("tree-a").await;
    let (org_b, api_b) = cp.create_org("tree-b").await;
    let mut a_ids = vec![
        id_of(&create_sandbox(&api_a, small("a1")).await),
        id_of(&create_sandbox(&api_a, small("a2")).await),
    ];
    a_ids.sort();
    let b_id = id_of(&create_sandbox(&api_b, small("b1")).await);
    let admin = cp.admin();

    let tree = tree_of(&admin, "").await;
    let mut all = a_ids.clone();
    all.push(b_id.clone());
    all.sort();
    assert_eq!(ids(&tree, "sandbox"), all);
    assert_eq!(ids(&tree, "host"), vec![agent.host_id.clone()]);
    let mut sandboxes = Vec::new();
    collect(&tree, "sandbox", &mut sandboxes);
    for s in &sandboxes {
        assert_eq!(s["status"], "running");
        assert_eq!(s["host_id"], agent.host_id.as_str());
        assert!(s["uptime_seconds"].as_f64().is_some(), "{s}");
        assert_eq!(s["restarts"], 0);
    }

    // Filters keep the matching actors and their ancestors only.
    let by_org = tree_of(&admin, &format!("?org_id={org_a}")).await;
    assert_eq!(ids(&by_org, "sandbox"), a_ids);
    assert_eq!(ids(&by_org, "ledger"), vec![org_a.clone()]);
    let by_kind = tree_of(&admin, "?kind=ledger").await;
    assert!(ids(&by_kind, "sandbox").is_empty());
    let mut ledgers = vec![org_a.clone(), org_b.clone()];
    ledgers.sort();
    assert_eq!(ids(&by_kind, "ledger"), ledgers);
    let by_host = tree_of(
        &admin,
        &format!("?host_id={}&kind=connection", agent.host_id),
    )
    .await;
    assert_eq!(ids(&by_host, "connection").len(), 1);
    assert!(tree_of(&admin, "?host_id=hst_nope").await["children"].is_null());
    let (status, body) = admin.get("/v1/admin/actors?kind=nonsense").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["error"]["code"], "invalid_argument");

    // A restarted actor is back, with its restart and error on record.
    assert!(cp.server.control_plane.inject_panic("sandbox", &a_ids[0]));
    let restarted = wait_for("the restart in the tree", DEADLINE, || {
        let admin = admin.clone();
        let id = a_ids[0].clone();
        async move {
            let tree = tree_of(&admin, "?kind=sandbox").await;
            let mut nodes = Vec::new();
            collect(&tree, "sandbox", &mut nodes);
            nodes
                .into_iter()
                .find(|n| n["id"] == id.as_str() && n["restarts"] == 1)
        }
    })
    .await;
    assert!(
        restarted["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("injected")),
        "{restarted}"
    );
    assert_eq!(restarted["org_id"], org_a.as_str());
    assert_eq!(ids(&tree_of(&admin, "").await, "sandbox"), all);

    // A failed connection is not restarted in place: the agent dials again
    // and the host's next connection carries the count and the error.
    let first = ids(&tree_of(&admin, "?kind=connection").await, "connection");
    assert_eq!(first.len(), 1, "{first:?}");
    assert!(cp
        .server
        .control_plane
        .inject_panic("connection", &first[0]));
    let next = wait_for("the next connection with the restart", DEADLINE, || {
        let admin = admin.clone();
        let first = first[0].clone();
        async move {
            let tree = tree_of(&admin, "?kind=connection").await;
            let mut nodes = Vec::new();
            collect(&tree, "connection", &mut nodes);
            nodes
                .into_iter()
                .find(|n| n["id"] != first.as_str() && n["status"] == "running")
        }
    })
    .await;
    assert_eq!(next["restarts"], 1, "{next}");
    assert!(
        next["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("injected")),
        "{next}"
    );

    // A destroyed sandbox leaves the tree.
    let (status, _) = api_b.delete(&format!("/v1/sandboxes/{b_id}")).await;
    assert!(status.is_success());
    wait_for("the destroyed sandbox to leave", DEADLINE, || {
        let admin = admin.clone();
        let a_ids = a_ids.clone();
        async move { (ids(&tree_of(&admin, "").await, "sandbox") == a_ids).then_some(()) }
    })
    .await;
}

// ---- events -------------------------------------------------------------

/// Reads SSE messages from a streaming response into a channel.
fn sse_messages(
    mut response: reqwest::Response,
) -> tokio::sync::mpsc::UnboundedReceiver<(String, Value)> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut buffer = String::new();
        while let Ok(Some(chunk)) = response.chunk().await {
            buffer.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(end) = buffer.find("\n\n") {
                let message: String = buffer.drain(..end + 2).collect();
                let mut event = String::new();
                let mut data = String::new();
                for line in message.lines() {
                    if let Some(v) = line.strip_prefix("event:") {
                        event = v.trim().to_string();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.trim());
                    }
                }
                if event.is_empty() {
                    continue; // a keep-alive comment
                }
                let value = serde_json::from_str(&data).unwrap_or(Value::Null);
                if tx.send((event, value)).is_err() {
                    return;
                }
            }
        }
    });
    rx
}

#[tokio::test]
async fn events_stream_one_orgs_transitions_in_order_and_no_others() {
    let cp = TestServer::start().await;
    let _agent = cp.fake_agent(8000, 8192, FakeConfig::default()).await;
    let (org_a, api_a) = cp.create_org("events-a").await;
    let (_org_b, api_b) = cp.create_org("events-b").await;
    let client = corral_tests::http_client();

    let (status, body) = api_a.get("/v1/events").await;
    assert_eq!(status, StatusCode::NOT_ACCEPTABLE, "{body}");
    assert_eq!(body["error"]["code"], "not_acceptable");

    let response = client
        .get(format!("{}/v1/events", cp.server.http_url()))
        .bearer_auth(&api_a.token)
        .header("accept", "text/event-stream")
        .send()
        .await
        .expect("the stream opens");
    assert_eq!(response.status(), StatusCode::OK);
    let mut events = sse_messages(response);

    // The other org's sandbox first, then ours, through to destroyed.
    let other = id_of(&create_sandbox(&api_b, small("theirs")).await);
    let ours = id_of(&create_sandbox(&api_a, small("ours")).await);
    let (status, _) = api_a.delete(&format!("/v1/sandboxes/{ours}")).await;
    assert!(status.is_success());
    let (status, _) = api_b.delete(&format!("/v1/sandboxes/{other}")).await;
    assert!(status.is_success());

    let mut seen: Vec<(String, Value)> = Vec::new();
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !seen.iter().any(|(_, e)| e["to"] == "destroyed") {
        let next = tokio::time::timeout_at(deadline, events.recv())
            .await
            .expect("events until destroyed")
            .expect("the stream stays open");
        seen.push(next);
    }
    let states: Vec<&str> = seen
        .iter()
        .filter(|(name, _)| name == "sandbox")
        .filter_map(|(_, e)| e["to"].as_str())
        .collect();
    assert_eq!(
        states,
        [
            "scheduled",
            "creating",
            "running",
            "destroying",
            "destroyed"
        ],
        "{seen:?}"
    );
    let mut last_seq = 0;
    for (name, event) in &seen {
        assert_eq!(event["org_id"], org_a.as_str(), "only our org: {event}");
        if name == "sandbox" {
            assert_eq!(event["sandbox_id"], ours.as_str());
        }
        let seq = event["seq"].as_u64().expect("a sequence number");
        assert!(seq > last_seq, "in order: {seen:?}");
        last_seq = seq;
    }
    // Nothing of the other org arrives afterwards either.
    let after = tokio::time::timeout(Duration::from_millis(500), events.recv()).await;
    if let Ok(Some((_, event))) = after {
        assert_eq!(event["org_id"], org_a.as_str(), "{event}");
    }
}

#[tokio::test]
async fn the_actor_tree_and_metrics_show_messages_waiting_in_a_busy_mailbox() {
    let cp = TestServer::start().await;
    let config = FakeConfig {
        latency: Duration::from_millis(1500),
        ..FakeConfig::default()
    };
    let _agent = cp.fake_agent(8000, 8192, config).await;
    let (_org, api) = cp.create_org("mailbox").await;
    let id = id_of(&create_sandbox(&api, small("busy")).await);
    let admin = cp.admin();
    let depth = |tree: &Value| {
        let mut nodes = Vec::new();
        collect(tree, "sandbox", &mut nodes);
        nodes
            .iter()
            .find(|n| n["id"] == id.as_str())
            .and_then(|n| n["mailbox"].as_u64())
    };
    assert_eq!(depth(&tree_of(&admin, "").await), Some(0));

    // Each stop or start holds the sandbox's actor for the runtime's
    // latency; the requests behind it wait in its mailbox. The first stop
    // is under way before the others are sent (spawned together, a start
    // could come first and be answered at once, leaving less to queue).
    let send = |verb: &str| {
        let api = api.clone();
        let path = format!("/v1/sandboxes/{id}/{verb}");
        tokio::spawn(async move { api.post(&path, json!({})).await })
    };
    let mut requests = vec![send("stop")];
    wait_for("the first stop under way", DEADLINE, || {
        let api = api.clone();
        let path = format!("/v1/sandboxes/{id}");
        async move {
            let state = api.get(&path).await.1["state"].clone();
            (state == "stopping" || state == "stopped").then_some(())
        }
    })
    .await;
    requests.extend(["start", "stop", "start"].map(send));
    let waiting = wait_for(
        "messages waiting in the sandbox's mailbox",
        DEADLINE,
        || {
            let admin = admin.clone();
            let depth = &depth;
            async move { depth(&tree_of(&admin, "").await).filter(|n| *n >= 2) }
        },
    )
    .await;
    let metrics = scrape(&format!("{}/metrics", admin.base)).await;
    let deepest = metrics
        .get("corral_actor_mailbox_max_messages{kind=\"sandbox\"}")
        .copied()
        .unwrap_or_default();
    assert!(deepest >= 1.0, "max mailbox {deepest} while {waiting} wait");

    for request in requests {
        let (status, body) = request.await.expect("request task");
        assert!(status.is_success(), "{status} {body}");
    }
    wait_for("the mailbox to empty", DEADLINE, || {
        let admin = admin.clone();
        let depth = &depth;
        async move { (depth(&tree_of(&admin, "").await) == Some(0)).then_some(()) }
    })
    .await;
}
