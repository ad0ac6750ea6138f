//! Who may send this node a VM over the migration network: the target's
//! [`SessionAuthorizer`]. A session goes ahead only for a migration the leader committed —
//! the record named by the ticket (its id) is a live migration of this VM, from the node
//! the source's certificate names, to this node, still running — and only once per
//! record. Everything is checked before the engine creates anything or any disk lock moves.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cluster_proto::pki::{self, Identity};
use vmm_node::migration::tls::SessionAuthorizer;

use crate::node::Agent;
use crate::state::migrations::{MigrationKind, MigrationState};

/// How long the target waits for its replica to show a record the source already sees.
pub const RECORD_WAIT: Duration = Duration::from_secs(3);
/// Tickets remembered as used (older ones belong to finished records anyway).
const USED_TICKETS_MAX: usize = 4_096;

/// The cluster's authorizer of incoming migration sessions.
pub struct ClusterAuthorizer {
    agent: Arc<Agent>,
    used: Mutex<BTreeSet<u64>>,
}

impl ClusterAuthorizer {
    pub fn new(agent: Arc<Agent>) -> ClusterAuthorizer {
        ClusterAuthorizer {
            agent,
            used: Mutex::default(),
        }
    }

    /// Why the record `id` does not allow `vm` from node `source` here (`None`: it does).
    fn refusal(&self, id: u64, vm: &str, source: u64) -> Option<String> {
        let me = self.agent.node_id();
        let rec = self.agent.read_sm(|d| d.state.migrations.get(&id).cloned());
        let Some(r) = rec else {
            return Some(format!("no migration {id} is committed"));
        };
        if r.vm != vm {
            return Some(format!("migration {id} moves VM {:?}, not {vm:?}", r.vm));
        }
        if r.source != source {
            return Some(format!(
                "migration {id} leaves node {}, not node {source}",
                r.source
            ));
        }
        if r.target != me {
            return Some(format!(
                "migration {id} goes to node {}, not here (node {me})",
                r.target
            ));
        }
        if r.kind != MigrationKind::Live {
            return Some(format!("migration {id} is not a live migration"));
        }
        if r.state != MigrationState::Running {
            return Some(format!("migration {id} is not running ({:?})", r.state));
        }
        None
    }
}

impl SessionAuthorizer for ClusterAuthorizer {
    fn authorize(
        &self,
        peer_cert_der: Option<&[u8]>,
        vm: &str,
        ticket: &[u8],
    ) -> Result<(), String> {
        let source = match peer_cert_der.map(pki::identity_of) {
            Some(Ok(Identity::Node(id))) => id,
            Some(Ok(other)) => return Err(format!("{other} is no cluster node")),
            Some(Err(e)) => return Err(format!("the source's certificate: {e}")),
            // Plaintext (an isolated network the operator configured): the record check
            // below is all there is.
            None => 0,
        };
        let id = crate::vmhost::live_migration::ticket_id(ticket)
            .ok_or_else(|| "no migration ticket (the id of a committed migration)".to_string())?;
        if self.agent.read_sm(|d| !d.state.nodes.contains_key(&source)) && source != 0 {
            return Err(format!("node {source} is not a member"));
        }
        // The source acted on a committed record; this replica may still be applying it.
        let deadline = Instant::now() + RECORD_WAIT;
        let source_of = |id| {
            self.agent
                .read_sm(|d| d.state.migrations.get(&id).map(|r| r.source))
        };
        let source = if source == 0 {
            source_of(id).unwrap_or(0)
        } else {
            source
        };
        loop {
            match self.refusal(id, vm, source) {
                None => break,
                Some(why) if Instant::now() >= deadline => return Err(why),
                Some(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        let mut used = self.used.lock().unwrap_or_else(|p| p.into_inner());
        if !used.insert(id) {
            return Err(format!("the ticket of migration {id} was used already"));
        }
        while used.len() > USED_TICKETS_MAX {
            used.pop_first();
        }
        tracing::info!(vm, migration = id, source, "incoming migration authorized");
        Ok(())
    }
}
