//! Following an mqlb cluster's view, for backends that are its nodes
//! (`cluster_admin` on a `[[backend]]`), so that the balancer and the
//! cluster agree about who may serve clients as well as the probes do.
//!
//! Every health interval each node's `GET /cluster` is read (a plain
//! HTTP/1.0 request; the answer is small JSON). Only nodes that say they
//! are ready count: a node without a majority or still syncing is not.
//! When a majority of the configured nodes answer ready, a node is placed
//! on only if a majority of them list it in their view; with fewer answers
//! there is nothing to agree on and the probes decide alone. A node that
//! leaves the view keeps its connections (it closes them itself when it
//! steps down, with DISCONNECT 0x8B); new clients go to the others.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::nodeview::{NodeTraffic, NodeView};
use crate::shared::Shared;

/// Largest `/cluster` answer read.
const MAX_ANSWER: u64 = 64 << 10;

/// Reads `http://{admin}/cluster` within `timeout`, with the bearer
/// `token` when the nodes' admin APIs need one.
pub async fn fetch(admin: &str, token: Option<&str>, timeout: Duration) -> Option<NodeView> {
    let get = async {
        let mut s = TcpStream::connect(admin).await.ok()?;
        let auth = token.map_or_else(String::new, |t| format!("Authorization: Bearer {t}\r\n"));
        s.write_all(format!("GET /cluster HTTP/1.0\r\nHost: {admin}\r\n{auth}\r\n").as_bytes())
            .await
            .ok()?;
        let mut raw = Vec::new();
        s.take(MAX_ANSWER).read_to_end(&mut raw).await.ok()?;
        Some(raw)
    };
    let raw = tokio::time::timeout(timeout, get).await.ok()??;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n")?;
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        return None;
    }
    let v: serde_json::Value = serde_json::from_str(body.trim()).ok()?;
    Some(NodeView {
        node: v.get("node")?.as_str()?.to_string(),
        ready: v.get("ready")?.as_bool()?,
        members: v
            .get("members")?
            .as_array()?
            .iter()
            .filter_map(|m| m.as_str().map(str::to_string))
            .collect(),
        view: v
            .get("view")
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(0),
        leader: v.get("leader").and_then(|l| l.as_str()).map(str::to_string),
        term: v
            .get("term")
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(0),
        links: v
            .get("links")
            .and_then(serde_json::Value::as_array)
            .map(|ls| {
                ls.iter()
                    .filter_map(|l| {
                        Some((
                            l.get("peer")?.as_str()?.to_string(),
                            l.get("state")?.as_str()?.to_string(),
                        ))
                    })
                    .collect()
            })
            .unwrap_or_default(),
        traffic: v.get("traffic").map_or_else(NodeTraffic::default, |t| {
            let n = |k: &str| t.get(k).and_then(serde_json::Value::as_u64).unwrap_or(0);
            NodeTraffic {
                clients: n("clients"),
                sessions: n("sessions"),
                subscriptions: n("subscriptions"),
                retained: n("retained"),
                messages_in: n("messages_in"),
                messages_out: n("messages_out"),
                dropped: n("dropped"),
                rates: None,
            }
        }),
        at: std::time::Instant::now(),
    })
}

/// Which of `nodes` the cluster leaves out, given their answers (`None`:
/// no answer): `None` when too few ready answers agree to decide, or when
/// a node answers under another name than its backend's (the views name
/// nodes, placement hashes backend names: they must be the same).
pub fn left_out(nodes: &[String], answers: &[Option<NodeView>]) -> Option<Vec<bool>> {
    let misnamed = nodes
        .iter()
        .zip(answers)
        .any(|(n, a)| a.as_ref().is_some_and(|a| &a.node != n));
    if misnamed {
        return None;
    }
    let quorum = nodes.len() / 2 + 1;
    let ready: Vec<&NodeView> = answers.iter().flatten().filter(|v| v.ready).collect();
    if ready.len() < quorum {
        return None;
    }
    Some(
        nodes
            .iter()
            .map(|n| ready.iter().filter(|v| v.members.contains(n)).count() < quorum)
            .collect(),
    )
}

/// Follows the view until `stop`.
pub async fn follow(shared: Arc<Shared>, stop: CancellationToken) {
    loop {
        let interval = shared
            .config()
            .health
            .interval
            .max(Duration::from_millis(100));
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = stop.cancelled() => return,
        }
        let members: Vec<_> = shared
            .backends
            .snapshot()
            .iter()
            .filter(|b| b.cluster_admin.is_some())
            .cloned()
            .collect();
        if members.is_empty() {
            continue;
        }
        let timeout = shared.config().health.timeout;
        // Read at every round: a rotated token is picked up.
        let token = shared
            .config()
            .balancer
            .cluster_admin_token_file
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .and_then(|t| t.lines().next().map(|l| l.trim().to_string()));
        let mut answers = Vec::with_capacity(members.len());
        for b in &members {
            let admin = b.cluster_admin.as_deref().unwrap_or_default();
            answers.push(fetch(admin, token.as_deref(), timeout).await);
        }
        for (b, a) in members.iter().zip(&answers) {
            b.set_cluster_node(a.clone());
        }
        let names: Vec<String> = members.iter().map(|b| b.name.clone()).collect();
        for (b, a) in members.iter().zip(&answers) {
            if let Some(a) = a.as_ref().filter(|a| a.node != b.name) {
                tracing::warn!(
                    backend = %b.name,
                    node = %a.node,
                    "cluster_admin answers as another node: name the backend after its node ID; the cluster's view is not followed"
                );
            }
        }
        let Some(out) = left_out(&names, &answers) else {
            for b in &members {
                b.set_out_of_view(false);
            }
            continue;
        };
        for (b, out) in members.iter().zip(out) {
            if b.set_out_of_view(out) {
                let what = if out {
                    "left out of the cluster's view: no new clients"
                } else {
                    "back in the cluster's view"
                };
                tracing::info!(backend = %b.name, "{what}");
                shared.journal.record("cluster", &b.name, what);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(ready: bool, members: &[&str]) -> Option<NodeView> {
        Some(NodeView {
            node: String::new(),
            ready,
            members: members.iter().map(|m| m.to_string()).collect(),
            view: 1,
            leader: None,
            term: 1,
            links: Vec::new(),
            traffic: NodeTraffic::default(),
            at: std::time::Instant::now(),
        })
    }

    /// Answers as nodes n1, n2, n3 in order.
    fn named(answers: [Option<NodeView>; 3]) -> Vec<Option<NodeView>> {
        answers
            .into_iter()
            .enumerate()
            .map(|(i, a)| {
                a.map(|mut a| {
                    a.node = format!("n{}", i + 1);
                    a
                })
            })
            .collect()
    }

    #[test]
    fn a_majority_of_ready_views_decides() {
        let nodes: Vec<String> = ["n1", "n2", "n3"].iter().map(|s| s.to_string()).collect();
        // n1 cut off: it is not ready; n2 and n3 see each other.
        let a = named([
            v(false, &["n1"]),
            v(true, &["n2", "n3"]),
            v(true, &["n2", "n3"]),
        ]);
        assert_eq!(left_out(&nodes, &a), Some(vec![true, false, false]));
        // Everyone sees everyone.
        let all = v(true, &["n1", "n2", "n3"]);
        assert_eq!(
            left_out(&nodes, &named([all.clone(), all.clone(), all.clone()])),
            Some(vec![false, false, false])
        );
        // Only one ready answer: nothing to agree on.
        let one = named([v(true, &["n1"]), None, v(false, &[])]);
        assert_eq!(left_out(&nodes, &one), None);
        // Views that disagree: a node listed by only one of two is out.
        let split = named([None, v(true, &["n1", "n2"]), v(true, &["n2", "n3"])]);
        assert_eq!(left_out(&nodes, &split), Some(vec![true, false, true]));
        // A backend named apart from its node: the views cannot be
        // followed (they would leave every backend out).
        let mut wrong = named([all.clone(), all.clone(), all]);
        if let Some(a) = wrong[0].as_mut() {
            a.node = "node-1".into();
        }
        assert_eq!(left_out(&nodes, &wrong), None);
    }
}
