//! `detection`: how long the control plane takes to see a dead agent.
//! Two ways to die: the process is killed (its TCP stream is cut, which the
//! control plane sees at once) and the agent hangs with its stream open
//! (heartbeats stop; the bound is three intervals). Then the time from the
//! disconnect to `offline`, against the configured grace.

use std::time::{Duration, Instant};

use corral_actors::domain::HostState;

use super::sim_agent::{SimAgent, SimConfig};
use super::{Params, Report};
use crate::TestServer;

pub async fn run(params: &Params) -> Report {
    if params.quick {
        run_with(true, 500, 2_000).await
    } else {
        run_with(false, 2_000, 10_000).await
    }
}

async fn host_state(server: &TestServer, host_id: &str) -> Option<String> {
    server
        .server
        .control_plane
        .store()
        .get_host(host_id)
        .await
        .ok()
        .flatten()
        .map(|h| h.state)
}

/// Polls the host row every 5 ms until it is in `state`; the time it took.
async fn time_until(
    server: &TestServer,
    host_id: &str,
    state: HostState,
    limit: Duration,
) -> Option<Duration> {
    let started = Instant::now();
    while started.elapsed() < limit {
        if host_state(server, host_id).await.as_deref() == Some(state.as_str()) {
            return Some(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    None
}

pub async fn run_with(quick: bool, heartbeat_ms: u64, offline_grace_ms: u64) -> Report {
    let mut report = Report::new(
        "detection",
        quick,
        &format!(
            "killed: disconnected < 1 s; hung: disconnected <= 3 x heartbeat ({} ms) + 0.5 s; \
             offline <= grace ({offline_grace_ms} ms) + 0.5 s after the disconnect",
            3 * heartbeat_ms
        ),
    );
    let server = TestServer::start_with(|c| {
        c.heartbeat_ms = heartbeat_ms;
        c.offline_grace_ms = offline_grace_ms;
    })
    .await;
    let limit = Duration::from_millis(3 * heartbeat_ms + offline_grace_ms + 10_000);
    let agent = |token: String| SimConfig {
        url: server.server.grpc_url(),
        token,
        cpu_millis: 4_000,
        memory_mb: 4_096,
        // Long enough that a redial does not blur the measurement.
        reconnect_delay: Duration::from_secs(3_600),
    };

    // Killed: the stream is cut.
    let (killed_id, token) = server.host_token("killed").await;
    let killed = SimAgent::start(&killed_id, agent(token), Vec::new());
    server.wait_host_ready(&killed_id).await;
    killed.kill();
    let to_disconnected = time_until(&server, &killed_id, HostState::Disconnected, limit).await;
    let to_offline = time_until(&server, &killed_id, HostState::Offline, limit).await;

    // Hung: the stream stays open, heartbeats stop.
    let (hung_id, token) = server.host_token("hung").await;
    let hung = SimAgent::start(&hung_id, agent(token), Vec::new());
    server.wait_host_ready(&hung_id).await;
    hung.silence();
    let hung_disconnected = time_until(&server, &hung_id, HostState::Disconnected, limit).await;
    drop(hung);
    drop(killed);
    server.server.shutdown().await;

    let ms = |d: Option<Duration>| d.map_or(-1.0, |d| d.as_secs_f64() * 1e3);
    report.figure("heartbeat_interval", heartbeat_ms as f64, "ms");
    report.figure("offline_grace", offline_grace_ms as f64, "ms");
    report.figure("killed_to_disconnected", ms(to_disconnected), "ms");
    report.figure("disconnected_to_offline", ms(to_offline), "ms");
    report.figure("hung_to_disconnected", ms(hung_disconnected), "ms");
    let slack = Duration::from_millis(500);
    report.pass = Some(
        to_disconnected.is_some_and(|d| d < Duration::from_secs(1))
            && to_offline.is_some_and(|d| d <= Duration::from_millis(offline_grace_ms) + slack)
            && hung_disconnected
                .is_some_and(|d| d <= Duration::from_millis(3 * heartbeat_ms) + slack),
    );
    if to_disconnected.is_none() || to_offline.is_none() || hung_disconnected.is_none() {
        report.note("a transition was not seen in time (-1 means never)");
    }
    report.note("hung_to_disconnected counts from the last heartbeat sent, up to one interval before the silence");
    report
}
