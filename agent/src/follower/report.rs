//! What a round tells beyond the datapath: a failed policy sync on the Node (log, metric,
//! event) and how far the programmed state has caught up.

use std::{collections::BTreeMap, path::Path, sync::atomic::Ordering, sync::Arc};

use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::Node;
use kube::runtime::events::{Event, EventType};
use tracing::{info, warn};

use super::Follower;

impl Follower {
    /// A policy sync that failed left the node tighter than desired (see
    /// `Maps::sync_policy`): said once per change of the error, in the log and as a Node
    /// event, and counted every time.
    pub(super) async fn report_policy_sync(&mut self, error: Option<String>, nodes: &[Arc<Node>]) {
        self.metrics
            .policy_fail_closed
            .store(error.is_some(), Ordering::Relaxed);
        if error.is_some() {
            self.metrics
                .policy_sync_failures
                .fetch_add(1, Ordering::Relaxed);
        }
        if error == self.policy_sync_error {
            return;
        }
        let event = match &error {
            Some(e) => {
                warn!("programming NetworkPolicy failed closed: {e}");
                Event {
                    type_: EventType::Warning,
                    reason: "PolicyProgrammingFailed".into(),
                    // The API server caps a note at 1 kB.
                    note: Some(e.chars().take(1000).collect()),
                    action: "ProgramNetworkPolicy".into(),
                    secondary: None,
                }
            }
            None => {
                info!("NetworkPolicy is programmed in full again");
                Event {
                    type_: EventType::Normal,
                    reason: "PolicyProgrammed".into(),
                    note: Some("every NetworkPolicy entry is programmed again".into()),
                    action: "ProgramNetworkPolicy".into(),
                    secondary: None,
                }
            }
        };
        self.policy_sync_error = error;
        self.publish_on_node(nodes, event).await;
    }

    /// Records `event` on this agent's Node; a failure is only logged.
    pub(super) async fn publish_on_node(&self, nodes: &[Arc<Node>], event: Event) {
        let uid = nodes
            .iter()
            .find(|n| n.metadata.name.as_deref() == Some(&self.own))
            .and_then(|n| n.metadata.uid.clone());
        self.events.on_node(&self.own, uid, &event).await;
    }
}

/// How far the programmed state has caught up with the API server, per watched kind
/// (`programmed.json`, every round): for the lab, and for operators.
pub(super) fn write_programmed(
    state_dir: &Path,
    revisions: &BTreeMap<&'static str, u64>,
) -> Result<()> {
    let programmed = serde_json::json!({ "programmedResourceVersions": revisions });
    replace(
        &state_dir.join("programmed.json"),
        &serde_json::to_vec_pretty(&programmed)?,
    )
}

/// Replaces `path` whole (a reader sees the old file or the new one, never half of one).
fn replace(path: &Path, contents: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, contents)
        .and_then(|()| std::fs::rename(&tmp, path))
        .with_context(|| format!("writing {}", path.display()))
}
