//! The state changes operators and dashboards watch live (`GET /v1/events`):
//! sandbox transitions and billing-status transitions, each tagged with its
//! org and a process-wide sequence number, on one broadcast channel. The
//! sandbox and ledger actors publish after they persisted the change;
//! publishing never blocks (a subscriber too slow for the buffer misses
//! events and is told so). Subscribers filter by org.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio::sync::broadcast;

/// Events kept for slow subscribers before they lag.
const BUFFER: usize = 4096;

#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum EventKind {
    /// A sandbox's recorded state changed (`from` is absent for a new one).
    Sandbox {
        sandbox_id: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        from: Option<String>,
        to: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    /// The org's billing status changed.
    Billing {
        from: String,
        to: String,
        balance_micros: i64,
    },
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Event {
    /// Increases by one per event published in this process.
    pub seq: u64,
    pub org_id: String,
    pub at: DateTime<Utc>,
    #[serde(flatten)]
    pub kind: EventKind,
}

impl Event {
    /// The SSE `event:` name.
    pub fn name(&self) -> &'static str {
        match self.kind {
            EventKind::Sandbox { .. } => "sandbox",
            EventKind::Billing { .. } => "billing",
        }
    }
}

/// The control plane's event channel. Cheap to clone.
#[derive(Debug, Clone)]
pub struct EventBus {
    tx: broadcast::Sender<Event>,
    seq: Arc<AtomicU64>,
}

impl Default for EventBus {
    fn default() -> Self {
        let (tx, _) = broadcast::channel(BUFFER);
        Self {
            tx,
            seq: Arc::new(AtomicU64::new(0)),
        }
    }
}

impl EventBus {
    pub fn publish(&self, org_id: &str, kind: EventKind) {
        if self.tx.receiver_count() == 0 {
            return;
        }
        let event = Event {
            seq: self.seq.fetch_add(1, Ordering::Relaxed) + 1,
            org_id: org_id.to_string(),
            at: Utc::now(),
            kind,
        };
        let _ = self.tx.send(event);
    }

    /// Every event published from now on (of every org: filter).
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.tx.subscribe()
    }
}
