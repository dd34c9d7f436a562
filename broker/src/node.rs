//! One broker node: its shared state (the core behind its lock) and, in a
//! cluster, its cluster membership. Connections hold a [`Node`]; the
//! cluster holds only the state, and serves relayed clients through the
//! function it is started with, so neither the state nor the cluster
//! refers back to the connections, and no `Arc` points in a circle.

use std::sync::Arc;

use crate::cluster::Cluster;
use crate::state::State;

/// A broker node: what every connection shares.
#[derive(Debug)]
pub struct Node {
    state: Arc<State>,
    cluster: Option<Arc<Cluster>>,
}

impl Node {
    /// A node with this state, a member of `cluster` if given (the core
    /// then reports interest, retained writes and forwards to it).
    pub fn new(state: Arc<State>, cluster: Option<Arc<Cluster>>) -> Arc<Node> {
        if let Some(c) = &cluster {
            state.join(c.clone(), c.stamp(), c.max_clock_drift());
        }
        Arc::new(Node { state, cluster })
    }

    /// A single node (no cluster).
    pub fn single(state: Arc<State>) -> Arc<Node> {
        Self::new(state, None)
    }

    /// The cluster, if this node is in one.
    pub fn cluster(&self) -> Option<Arc<Cluster>> {
        self.cluster.clone()
    }

    /// The shared state.
    pub fn state(&self) -> &Arc<State> {
        &self.state
    }
}

impl std::ops::Deref for Node {
    type Target = State;

    fn deref(&self) -> &State {
        &self.state
    }
}
