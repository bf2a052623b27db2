//! A snapshot of the live supervision tree for operators
//! (`GET /v1/admin/actors`). It walks ractor's own parent/child links, so it
//! shows what really runs, not what some table believes runs, and enriches
//! each actor from the supervisors' [`ActorRegistry`] (org, uptime,
//! restarts, last error). It sends no message to any actor: a tree of
//! 100,000 actors is read without waiting on one of them.
//!
//! Mailbox lengths come from [`crate::mailbox`], which counts every send
//! and every handled message.

use ractor::{ActorCell, ActorStatus};
use serde::Serialize;

use crate::actors::names;
use crate::mailbox;
use crate::metrics::ActorRegistry;

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ActorNode {
    pub kind: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    pub status: String,
    /// For a host: its connection and operator state, e.g. `ready/cordoned`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    /// The org the actor works for (sandboxes, ledgers).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub org_id: Option<String>,
    /// The host the actor belongs to (hosts, their connections and
    /// sandboxes).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host_id: Option<String>,
    /// Seconds since this incarnation started (unknown for the root).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uptime_seconds: Option<f64>,
    /// How often its supervisor restarted it after a failure.
    pub restarts: u32,
    /// Messages sent to it and not yet handled.
    pub mailbox: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub children: Vec<ActorNode>,
}

/// Which actors to show: a node is kept when it matches every filter given
/// or has a descendant that does (its ancestors give the context).
#[derive(Debug, Clone, Default)]
pub struct TreeFilter {
    pub kind: Option<String>,
    pub org_id: Option<String>,
    pub host_id: Option<String>,
}

impl TreeFilter {
    fn matches(&self, node: &ActorNode) -> bool {
        self.kind.as_ref().is_none_or(|k| *k == node.kind)
            && self
                .org_id
                .as_ref()
                .is_none_or(|o| node.org_id.as_ref() == Some(o))
            && self
                .host_id
                .as_ref()
                .is_none_or(|h| node.host_id.as_ref() == Some(h))
    }

    fn is_empty(&self) -> bool {
        self.kind.is_none() && self.org_id.is_none() && self.host_id.is_none()
    }
}

impl ActorNode {
    /// Sets `state` on every node of `kind` whose id `state_of` knows.
    pub fn annotate(&mut self, kind: &str, state_of: &dyn Fn(&str) -> Option<String>) {
        if self.kind == kind {
            if let Some(id) = &self.id {
                self.state = state_of(id);
            }
        }
        for child in &mut self.children {
            child.annotate(kind, state_of);
        }
    }
}

fn status_text(status: ActorStatus) -> &'static str {
    match status {
        ActorStatus::Unstarted => "unstarted",
        ActorStatus::Starting => "starting",
        ActorStatus::Running => "running",
        ActorStatus::Upgrading => "upgrading",
        ActorStatus::Draining => "draining",
        ActorStatus::Stopping => "stopping",
        ActorStatus::Stopped => "stopped",
    }
}

/// The whole tree under `cell`.
pub fn snapshot(prefix: &str, cell: &ActorCell, registry: &ActorRegistry) -> ActorNode {
    walk(prefix, cell, registry, None, &TreeFilter::default()).unwrap_or_else(|| unnamed(cell))
}

/// The tree under `cell`, pruned to what `filter` asks for (the root is
/// always returned).
pub fn filtered(
    prefix: &str,
    cell: &ActorCell,
    registry: &ActorRegistry,
    filter: &TreeFilter,
) -> ActorNode {
    walk(prefix, cell, registry, None, filter).unwrap_or_else(|| {
        let mut root = node(prefix, cell, registry, None);
        root.children.clear();
        root
    })
}

fn unnamed(cell: &ActorCell) -> ActorNode {
    ActorNode {
        kind: "unknown".into(),
        id: None,
        status: status_text(cell.get_status()).into(),
        state: None,
        org_id: None,
        host_id: None,
        uptime_seconds: None,
        restarts: 0,
        mailbox: mailbox::depth(cell.get_id()).unwrap_or(0),
        last_error: None,
        children: Vec::new(),
    }
}

fn node(prefix: &str, cell: &ActorCell, registry: &ActorRegistry, host: Option<&str>) -> ActorNode {
    let name = cell.get_name().unwrap_or_default();
    let (kind, id) = names::parse(prefix, &name);
    let entry = registry.get(cell.get_id());
    let host_id = match kind {
        "host" => id.map(str::to_string),
        _ => host.map(str::to_string),
    };
    ActorNode {
        kind: kind.to_string(),
        id: id.map(str::to_string),
        status: status_text(cell.get_status()).to_string(),
        state: None,
        org_id: entry.as_ref().and_then(|e| e.org.clone()),
        host_id,
        uptime_seconds: entry.as_ref().map(|e| e.started.elapsed().as_secs_f64()),
        restarts: entry.as_ref().map_or(0, |e| e.restarts),
        mailbox: mailbox::depth(cell.get_id()).unwrap_or(0),
        last_error: entry.and_then(|e| e.last_error),
        children: Vec::new(),
    }
}

fn walk(
    prefix: &str,
    cell: &ActorCell,
    registry: &ActorRegistry,
    host: Option<&str>,
    filter: &TreeFilter,
) -> Option<ActorNode> {
    let mut this = node(prefix, cell, registry, host);
    let host_id = this.host_id.clone();
    let mut children: Vec<ActorNode> = cell
        .get_children()
        .iter()
        .filter_map(|child| walk(prefix, child, registry, host_id.as_deref(), filter))
        .collect();
    children.sort_by(|a, b| (&a.kind, &a.id).cmp(&(&b.kind, &b.id)));
    this.children = children;
    (filter.is_empty() || filter.matches(&this) || !this.children.is_empty()).then_some(this)
}
