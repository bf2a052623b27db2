//! A snapshot of the live supervision tree for operators
//! (`GET /v1/admin/actors`). It walks ractor's own parent/child links, so it
//! shows what really runs, not what some table believes runs.

use ractor::{ActorCell, ActorStatus};
use serde::Serialize;

use crate::actors::names;

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ActorNode {
    pub kind: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    pub status: String,
    /// For a host: its connection and operator state, e.g. `ready/cordoned`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub children: Vec<ActorNode>,
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

pub fn snapshot(prefix: &str, cell: &ActorCell) -> ActorNode {
    let name = cell.get_name().unwrap_or_default();
    let (kind, id) = names::parse(prefix, &name);
    let mut children: Vec<ActorNode> = cell
        .get_children()
        .iter()
        .map(|child| snapshot(prefix, child))
        .collect();
    children.sort_by(|a, b| (&a.kind, &a.id).cmp(&(&b.kind, &b.id)));
    ActorNode {
        kind: kind.to_string(),
        id: id.map(str::to_string),
        status: status_text(cell.get_status()).to_string(),
        state: None,
        children,
    }
}
