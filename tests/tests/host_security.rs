//! Host credentials and hostile agents: a revoked or expired host token
//! ends the agent's stream at once, and an agent with a valid token cannot
//! change, or get destroyed, a sandbox that lives on another host.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use corral_agent::fake::FakeConfig;
use corral_proto::pb;
use corral_tests::{create_sandbox, id_of, wait_for, InProcessAgent, TestServer};
use reqwest::StatusCode;
use serde_json::json;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

fn fake() -> FakeConfig {
    FakeConfig {
        latency: Duration::ZERO,
        fail_rate: 0.0,
        images: vec!["busybox".into()],
    }
}

async fn schedulable(cp: &TestServer, host_id: &str) -> bool {
    cp.server
        .control_plane
        .capacity()
        .await
        .ok()
        .and_then(|c| c.get(host_id).map(|c| c.schedulable))
        .unwrap_or(false)
}

async fn wait_unschedulable(cp: &TestServer, host_id: &str, within: Duration) {
    wait_for("the host to be cut off", within, || async {
        (!schedulable(cp, host_id).await).then_some(())
    })
    .await;
}

#[tokio::test]
async fn revoking_a_host_token_ends_its_stream_at_once() {
    // Heartbeats every 2 s: a drop within 1 s is the revocation, not a
    // missed heartbeat.
    let cp = TestServer::start_with(|c| c.heartbeat_ms = 2000).await;
    let agent = cp.fake_agent(4000, 4096, fake()).await;
    let (_, tokens) = cp.admin().get("/v1/admin/host-tokens").await;
    let token_id = tokens["host_tokens"][0]["id"]
        .as_str()
        .expect("token id")
        .to_string();

    let (status, body) = cp
        .admin()
        .delete(&format!("/v1/admin/host-tokens/{token_id}"))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    wait_unschedulable(&cp, &agent.host_id, Duration::from_secs(1)).await;

    // The agent redials with the revoked token and is refused: the host
    // stays cut off.
    let admin = cp.admin();
    wait_for("the host row to say so", Duration::from_secs(5), || {
        let admin = admin.clone();
        async move {
            let (_, hosts) = admin.get("/v1/admin/hosts").await;
            (hosts["hosts"][0]["state"] == "disconnected").then_some(())
        }
    })
    .await;
    assert!(!schedulable(&cp, &agent.host_id).await);
}

#[tokio::test]
async fn an_expired_host_token_is_refused_and_its_stream_ends() {
    let cp = TestServer::start_with(|c| c.heartbeat_ms = 2000).await;
    let (status, body) = cp
        .admin()
        .post(
            "/v1/admin/host-tokens",
            json!({"name": "short", "ttl_seconds": 2}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert!(body["expires_at"].is_string());
    let host_id = body["host_id"].as_str().expect("host").to_string();
    let token = body["token"].as_str().expect("token").to_string();
    let _agent = InProcessAgent::start(&host_id, &cp.server.grpc_url(), &token, 4000, 4096, fake());
    cp.wait_host_ready(&host_id).await;
    wait_unschedulable(&cp, &host_id, Duration::from_secs(5)).await;

    let (status, _) = cp
        .admin()
        .post(
            "/v1/admin/host-tokens",
            json!({"name": "past", "expires_at": "2001-01-01T00:00:00Z"}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

/// An agent with a valid token that lies: it claims `victim` in its
/// register inventory, sends an event that `victim` exited, and lists it in
/// every inventory. Records the destroys it is asked to run.
async fn lying_agent(
    url: String,
    token: String,
    victim: String,
    destroys: Arc<Mutex<Vec<String>>>,
) -> anyhow::Result<()> {
    let channel = tonic::transport::Endpoint::from_shared(url)?
        .connect()
        .await?;
    let mut client = pb::agent_service_client::AgentServiceClient::new(channel);
    let (tx, rx) = mpsc::channel(64);
    let claimed = |phase: pb::SandboxPhase| pb::SandboxStatus {
        sandbox_id: victim.clone(),
        phase: phase as i32,
        exit_code: Some(137),
        image: "busybox".into(),
        expires_at_unix_ms: 0,
    };
    let send = |payload, request_id| pb::AgentMessage {
        request_id,
        trace: None,
        payload: Some(payload),
    };
    tx.send(send(
        pb::agent_message::Payload::Register(pb::Register {
            agent_version: "evil".into(),
            hostname: "evil".into(),
            runtime: "fake".into(),
            isolated: false,
            capacity: Some(pb::Capacity {
                cpu_millis: 1000,
                memory_mb: 1024,
            }),
            images: vec!["busybox".into()],
            inventory: vec![claimed(pb::SandboxPhase::Stopped)],
            max_concurrent_commands: 8,
            labels: Default::default(),
        }),
        0,
    ))
    .await?;
    let mut request = tonic::Request::new(ReceiverStream::new(rx));
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse()?);
    let mut inbound = client.connect(request).await?.into_inner();
    tx.send(send(
        pb::agent_message::Payload::Event(pb::SandboxEvent {
            status: Some(claimed(pb::SandboxPhase::Stopped)),
            reason: "exited".into(),
        }),
        0,
    ))
    .await?;
    let heartbeats = tx.clone();
    tokio::spawn(async move {
        loop {
            let beat = pb::AgentMessage {
                request_id: 0,
                trace: None,
                payload: Some(pb::agent_message::Payload::Heartbeat(
                    pb::Heartbeat::default(),
                )),
            };
            if heartbeats.send(beat).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    while let Some(message) = inbound.message().await? {
        use pb::control_message::Payload;
        let result = match message.payload {
            Some(Payload::Inventory(_)) => pb::reply::Result::Inventory(pb::Inventory {
                sandboxes: vec![claimed(pb::SandboxPhase::Absent)],
            }),
            Some(Payload::Destroy(d)) => {
                destroys.lock().expect("lock").push(d.sandbox_id.clone());
                pb::reply::Result::Sandbox(pb::SandboxStatus {
                    sandbox_id: d.sandbox_id,
                    phase: pb::SandboxPhase::Absent as i32,
                    ..Default::default()
                })
            }
            _ => continue,
        };
        tx.send(send(
            pb::agent_message::Payload::Reply(pb::Reply {
                result: Some(result),
            }),
            message.request_id,
        ))
        .await?;
    }
    Ok(())
}

#[tokio::test]
async fn an_agent_cannot_touch_a_sandbox_on_another_host() {
    let cp = TestServer::start_with(|c| {
        c.reconcile_interval_ms = 200;
        c.orphan_grace_ms = 300;
    })
    .await;
    let honest = cp.fake_agent(4000, 4096, fake()).await;
    let (_, api) = cp.create_org("victim").await;
    let sandbox = create_sandbox(
        &api,
        json!({"image": "busybox", "command": ["sleep", "600"], "cpu_millis": 100, "memory_mb": 64}),
    )
    .await;
    let victim = id_of(&sandbox);

    let (evil_host, token) = cp.host_token("evil").await;
    let destroys = Arc::new(Mutex::new(Vec::new()));
    let evil = tokio::spawn(lying_agent(
        cp.server.grpc_url(),
        token,
        victim.clone(),
        destroys.clone(),
    ));
    cp.wait_host_ready(&evil_host).await;

    // The control plane treats the claim as an orphan of the lying host:
    // it asks that host (and only it) to destroy its "copy".
    wait_for(
        "the lie to be treated as an orphan",
        Duration::from_secs(10),
        || {
            let destroys = destroys.clone();
            let victim = victim.clone();
            async move {
                destroys
                    .lock()
                    .expect("lock")
                    .contains(&victim)
                    .then_some(())
            }
        },
    )
    .await;

    let (_, row) = api.get(&format!("/v1/sandboxes/{victim}")).await;
    assert_eq!(row["state"], "running", "{row}");
    assert!(row["exit_code"].is_null(), "{row}");
    assert_eq!(
        honest.runtime.phase(&victim),
        Some(corral_agent::runtime::Phase::Running),
        "the sandbox still runs on its real host"
    );
    let (status, out) = api
        .post(
            &format!("/v1/sandboxes/{victim}/exec"),
            json!({"argv": ["echo", "ok"]}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{out}");
    assert_eq!(out["stdout"], "ok\n");
    evil.abort();
}
