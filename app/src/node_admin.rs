//! A broker node's admin API: its console, status, metrics, liveness and
//! readiness, and the membership calls. Here, in the application, because
//! it is where the broker meets the HTTP server and console the balancer
//! library provides: neither library depends on the other.

/// The broker node's admin calls: `POST /cluster/members/{name}@{ip:port}`
/// adds a member (started with `--join`), `POST
/// /cluster/members/{name}/remove` retires one.
pub fn post(state: &mqlb_broker::node::Node, path: &str) -> mqlb_balancer::http::Reply {
    use hyper::StatusCode;
    use mqlb_balancer::http::Reply;
    if path == "/data/backup" {
        return backup(state);
    }
    let Some(cluster) = state.cluster() else {
        return Reply::text(StatusCode::NOT_FOUND, "not a cluster member\n");
    };
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    match parts.as_slice() {
        ["cluster", "members", peer] if peer.contains('@') => {
            let added = mqlb_config::broker::ClusterConfig::parse_peer(peer)
                .and_then(|(name, addr)| cluster.add_member(&name, addr).map(|()| name));
            match added {
                Ok(name) => Reply::text(
                    StatusCode::ACCEPTED,
                    format!("addition of {name} proposed; GET /cluster shows the membership\n"),
                ),
                Err(e) => Reply::text(StatusCode::CONFLICT, format!("{e}\n")),
            }
        }
        ["cluster", "members", name, "remove"] => match cluster.remove_member(name) {
            Ok(()) => Reply::text(
                StatusCode::ACCEPTED,
                format!("removal of {name} proposed; GET /cluster shows the membership\n"),
            ),
            Err(e) => Reply::text(StatusCode::CONFLICT, format!("{e}\n")),
        },
        _ => Reply::text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// `POST /data/backup`: a consistent copy of the node's data directory
/// (everything acknowledged so far) in `DATA_DIR/backups/backup-SECONDS`,
/// which a node can be started on as it is. The directory is chosen here,
/// never by the caller: an admin call must not write where it likes.
fn backup(state: &mqlb_broker::node::Node) -> mqlb_balancer::http::Reply {
    use hyper::StatusCode;
    use mqlb_balancer::http::Reply;
    let Some(store) = state.disk() else {
        return Reply::text(
            StatusCode::NOT_FOUND,
            "this node has no data directory (--data-dir)\n",
        );
    };
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let backups = store.dir().join("backups");
    if let Err(e) = std::fs::create_dir_all(&backups) {
        return Reply::text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("{}: {e}\n", backups.display()),
        );
    }
    let to = backups.join(format!("backup-{secs}"));
    let (tx, rx) = std::sync::mpsc::channel();
    store.backup(&to, move |r| {
        let _ = tx.send(r);
    });
    // The copy is made by the storage thread, in order after every write
    // before it; this admin request waits for it off the async workers.
    match tokio::task::block_in_place(|| rx.recv_timeout(std::time::Duration::from_secs(300))) {
        Ok(Ok(())) => {
            tracing::info!(to = %to.display(), "data directory backed up");
            Reply::text(StatusCode::OK, format!("{}\n", to.display()))
        }
        Ok(Err(e)) => Reply::text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("backup to {} failed: {e}\n", to.display()),
        ),
        Err(_) => Reply::text(
            StatusCode::GATEWAY_TIMEOUT,
            "the backup did not finish within 300 s\n",
        ),
    }
}

/// The broker node's admin API: metrics, liveness, readiness (a cluster
/// member is ready once it has synced from its live peers) and the view.
pub fn get(state: &mqlb_broker::node::Node, path: &str) -> mqlb_balancer::http::Reply {
    use hyper::StatusCode;
    use mqlb_balancer::http::Reply;
    let cluster = state.cluster();
    match path {
        "/metrics" => {
            let mut body = state.render_metrics();
            mqlb_balancer::metrics::render_process(&mut body);
            state.fronts.render(&mut body);
            state.statestore.render(&mut body);
            if let Some(c) = &cluster {
                c.render_metrics(&mut body);
            }
            Reply {
                status: StatusCode::OK,
                content_type: "text/plain; version=0.0.4",
                body,
            }
        }
        "/" => Reply::html(mqlb_balancer::console::NODE_PAGE),
        "/healthz" => Reply::text(StatusCode::OK, "ok\n"),
        "/readyz" => match &cluster {
            Some(c) if !c.ready() => {
                Reply::text(StatusCode::SERVICE_UNAVAILABLE, "syncing from peers\n")
            }
            _ => Reply::text(StatusCode::OK, "ok\n"),
        },
        "/cluster" => match &cluster {
            Some(_) => Reply::json(StatusCode::OK, status(state)),
            None => Reply::text(StatusCode::NOT_FOUND, "not a cluster member\n"),
        },
        "/status" => Reply::json(StatusCode::OK, status(state)),
        _ => Reply::text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// What a node says of itself (`GET /status`, and `GET /cluster` on a
/// cluster member): its version and traffic, and in a cluster its view,
/// Raft term, leader, membership and links to each peer. A node outside a
/// cluster answers as a one-member cluster that is always ready.
pub fn status(state: &mqlb_broker::node::Node) -> serde_json::Value {
    // The same counts as /metrics (clients and subscriptions are a scan of
    // the sessions under the core's lock, as there).
    let traffic = {
        let n = state.counts();
        serde_json::json!({
            "clients": n.clients,
            "sessions": n.sessions,
            "subscriptions": n.subscriptions,
            "retained": n.retained,
            "messages_in": n.stats.messages_in,
            "messages_out": n.stats.messages_out,
            "dropped": n.stats.dropped_total(),
        })
    };
    let Some(c) = state.cluster() else {
        return serde_json::json!({
            "node": "standalone",
            "version": env!("CARGO_PKG_VERSION"),
            "view": 0,
            "term": 0,
            "members": [],
            "ready": true,
            "leader": null,
            "membership": [],
            "links": [],
            "traffic": traffic,
        });
    };
    let view = c.view();
    let links: Vec<serde_json::Value> = c
        .peer_links()
        .into_iter()
        .map(|l| {
            serde_json::json!({
                "peer": l.peer,
                "state": l.state.label(),
                "heard_ms_ago": l.heard_ago.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
                "synced": l.synced,
                "buffered_bytes": l.buffered,
            })
        })
        .collect();
    serde_json::json!({
        "node": c.me(),
        "version": env!("CARGO_PKG_VERSION"),
        "view": view.number,
        "term": c.term(),
        "members": view.members,
        "ready": c.ready(),
        "leader": c.leader(),
        "membership": c.membership(),
        "links": links,
        "traffic": traffic,
    })
}
