//! How the replicated state is stored: one table from [`StateKey`]s to storage keys, and
//! the value stored under each. The RocksDB state machine (`raft::store`) writes and
//! loads through this module only, so the writer and the loader cannot disagree.
//!
//! A storage key is a prefix naming the kind of entity, then — for entities of which
//! there are many — the entity's id as a big-endian `u64` (so keys sort by id) or the
//! KV key's bytes. Values are JSON. **Changing a prefix or a value's shape is a storage
//! format change**: existing data dirs must still load.

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::{ClusterState, StateKey};

/// What follows a key's prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tail {
    /// Nothing: a singleton.
    Unit,
    /// A big-endian `u64` id.
    Id,
    /// The KV key's bytes.
    Text,
}

/// The table: every kind of stored entity with its prefix and its tail. One row per
/// [`StateKey`] variant (the id or text of the example key is ignored).
fn table() -> [(StateKey, &'static [u8], Tail); 15] {
    [
        (StateKey::Cluster, b"c", Tail::Unit),
        (StateKey::Node(0), b"n", Tail::Id),
        (StateKey::Kv(String::new()), b"k", Tail::Text),
        (StateKey::Event(0), b"e", Tail::Id),
        (StateKey::LastEventSeq, b"s", Tail::Unit),
        (StateKey::Vm(0), b"v", Tail::Id),
        (StateKey::LastVmId, b"i", Tail::Unit),
        (StateKey::Job(0), b"j", Tail::Id),
        (StateKey::JobMeta, b"jm", Tail::Unit),
        (StateKey::Locks, b"l", Tail::Unit),
        (StateKey::Migration(0), b"g", Tail::Id),
        (StateKey::LastMigrationId, b"G", Tail::Unit),
        (StateKey::JoinTokens, b"t", Tail::Unit),
        (StateKey::Revocations, b"r", Tail::Unit),
        (StateKey::Ca, b"A", Tail::Unit),
    ]
}

fn same_kind(a: &StateKey, b: &StateKey) -> bool {
    std::mem::discriminant(a) == std::mem::discriminant(b)
}

impl StateKey {
    /// The storage key of this entity.
    pub fn encode(&self) -> Vec<u8> {
        let rows = table();
        // Every variant has a row (checked by a test).
        let (prefix, tail) = rows
            .iter()
            .find(|(k, _, _)| same_kind(k, self))
            .map(|(_, p, t)| (*p, *t))
            .unwrap_or((b"?", Tail::Unit));
        let mut key = prefix.to_vec();
        match (tail, self) {
            (Tail::Id, StateKey::Node(id))
            | (Tail::Id, StateKey::Event(id))
            | (Tail::Id, StateKey::Vm(id))
            | (Tail::Id, StateKey::Job(id))
            | (Tail::Id, StateKey::Migration(id)) => key.extend_from_slice(&id.to_be_bytes()),
            (Tail::Text, StateKey::Kv(k)) => key.extend_from_slice(k.as_bytes()),
            _ => {}
        }
        key
    }

    /// The entity a storage key names; `None` for keys this table does not own (the
    /// store's own metadata, or keys of a newer format).
    pub fn decode(key: &[u8]) -> Option<StateKey> {
        // Longest prefix first, so "jm" is not read as job "m...".
        let mut rows = table();
        rows.sort_by_key(|(_, p, _)| std::cmp::Reverse(p.len()));
        for (kind, prefix, tail) in rows {
            let Some(rest) = key.strip_prefix(prefix) else {
                continue;
            };
            let id = || <[u8; 8]>::try_from(rest).ok().map(u64::from_be_bytes);
            let found = match (tail, kind) {
                (Tail::Unit, k) if rest.is_empty() => Some(k),
                (Tail::Id, StateKey::Node(_)) => id().map(StateKey::Node),
                (Tail::Id, StateKey::Event(_)) => id().map(StateKey::Event),
                (Tail::Id, StateKey::Vm(_)) => id().map(StateKey::Vm),
                (Tail::Id, StateKey::Job(_)) => id().map(StateKey::Job),
                (Tail::Id, StateKey::Migration(_)) => id().map(StateKey::Migration),
                (Tail::Text, StateKey::Kv(_)) => {
                    Some(StateKey::Kv(String::from_utf8_lossy(rest).into_owned()))
                }
                _ => None,
            };
            // A key of another shape may still belong to a row with a shorter prefix
            // (a job id whose first byte is `m` is not the job meta key).
            if found.is_some() {
                return found;
            }
        }
        None
    }
}

fn json<T: Serialize>(v: &T) -> Result<Vec<u8>, serde_json::Error> {
    serde_json::to_vec(v)
}

fn parse<T: DeserializeOwned>(v: &[u8]) -> Result<T, serde_json::Error> {
    serde_json::from_slice(v)
}

impl ClusterState {
    /// The stored value of entity `k`; `None` when it no longer exists (delete the key).
    pub fn stored_value(&self, k: &StateKey) -> Result<Option<Vec<u8>>, serde_json::Error> {
        Ok(match k {
            StateKey::Cluster => self.cluster.as_ref().map(json).transpose()?,
            StateKey::Node(id) => self.nodes.get(id).map(json).transpose()?,
            StateKey::Kv(key) => self.kv.get(key).map(json).transpose()?,
            StateKey::Event(seq) => self.events.get(seq).map(json).transpose()?,
            StateKey::LastEventSeq => Some(json(&self.last_event_seq)?),
            StateKey::Vm(id) => self.vms.get(id).map(json).transpose()?,
            StateKey::LastVmId => Some(json(&self.last_vm_id)?),
            StateKey::Job(id) => self.jobs.jobs.get(id).map(json).transpose()?,
            StateKey::JobMeta => Some(json(&(self.jobs.last_job_id, &self.jobs.policy))?),
            StateKey::Locks => Some(json(&self.locks)?),
            StateKey::Migration(id) => self.migrations.get(id).map(json).transpose()?,
            StateKey::LastMigrationId => Some(json(&self.last_migration_id)?),
            StateKey::JoinTokens => Some(json(&self.join_tokens)?),
            StateKey::Revocations => Some(json(&self.revocations)?),
            StateKey::Ca => self.ca.as_ref().map(json).transpose()?,
        })
    }

    /// Load the stored value of entity `k` (the inverse of [`ClusterState::stored_value`]).
    pub fn load_stored(&mut self, k: &StateKey, v: &[u8]) -> Result<(), serde_json::Error> {
        match k {
            StateKey::Cluster => self.cluster = Some(parse(v)?),
            StateKey::Node(_) => {
                let rec: super::NodeRecord = parse(v)?;
                self.nodes.insert(rec.registration.node_id, rec);
            }
            StateKey::Kv(key) => {
                self.kv.insert(key.clone(), parse(v)?);
            }
            StateKey::Event(_) => {
                let ev: super::Event = parse(v)?;
                self.events.insert(ev.seq, ev);
            }
            StateKey::LastEventSeq => self.last_event_seq = parse(v)?,
            StateKey::Vm(_) => {
                let vm: super::vms::VmRecord = parse(v)?;
                self.vms.insert(vm.id, vm);
            }
            StateKey::LastVmId => self.last_vm_id = parse(v)?,
            StateKey::Job(_) => {
                let job: super::jobs::JobRecord = parse(v)?;
                self.jobs.jobs.insert(job.id, job);
            }
            StateKey::JobMeta => {
                let (last, policy): (u64, super::jobs::BalancePolicy) = parse(v)?;
                self.jobs.last_job_id = last;
                self.jobs.policy = policy;
            }
            StateKey::Locks => self.locks = parse(v)?,
            StateKey::Migration(_) => {
                let m: super::migrations::MigrationRecord = parse(v)?;
                self.migrations.insert(m.id, m);
            }
            StateKey::LastMigrationId => self.last_migration_id = parse(v)?,
            StateKey::JoinTokens => self.join_tokens = parse(v)?,
            StateKey::Revocations => self.revocations = parse(v)?,
            StateKey::Ca => self.ca = Some(parse(v)?),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn examples() -> Vec<StateKey> {
        vec![
            StateKey::Cluster,
            StateKey::Node(7),
            StateKey::Kv("motd".into()),
            StateKey::Kv(String::new()),
            StateKey::Event(u64::MAX),
            StateKey::LastEventSeq,
            StateKey::Vm(1),
            StateKey::LastVmId,
            StateKey::Job(3),
            StateKey::JobMeta,
            StateKey::Locks,
            StateKey::Migration(9),
            StateKey::LastMigrationId,
            StateKey::JoinTokens,
            StateKey::Revocations,
            StateKey::Ca,
        ]
    }

    #[test]
    fn every_key_round_trips_and_has_its_own_prefix() {
        for k in examples() {
            let bytes = k.encode();
            assert_ne!(bytes.first(), Some(&b'?'), "{k:?} has no row in the table");
            assert_eq!(
                StateKey::decode(&bytes),
                Some(k.clone()),
                "{k:?} -> {bytes:?}"
            );
        }
        let rows = table();
        for (i, (a, pa, _)) in rows.iter().enumerate() {
            for (b, pb, _) in rows.iter().skip(i + 1) {
                assert!(!same_kind(a, b), "{a:?} has two rows");
                assert_ne!(pa, pb, "{a:?} and {b:?} share a prefix");
            }
        }
    }

    #[test]
    fn the_stored_format_is_unchanged() {
        // Existing data dirs hold these bytes: a change here breaks them.
        assert_eq!(StateKey::Cluster.encode(), b"c");
        assert_eq!(StateKey::Node(1).encode(), b"n\0\0\0\0\0\0\0\x01");
        assert_eq!(StateKey::Kv("a".into()).encode(), b"ka");
        assert_eq!(StateKey::JobMeta.encode(), b"jm");
        assert_eq!(StateKey::Migration(2).encode(), b"g\0\0\0\0\0\0\0\x02");
        assert_eq!(StateKey::LastMigrationId.encode(), b"G");
    }

    #[test]
    fn a_job_id_that_starts_like_the_meta_key_is_a_job() {
        let k = StateKey::Job(u64::from_be_bytes(*b"m\0\0\0\0\0\0\x01"));
        assert_eq!(StateKey::decode(&k.encode()), Some(k));
    }

    #[test]
    fn foreign_and_malformed_keys_are_not_claimed() {
        for k in [
            &b"m:applied"[..],
            b"m:membership",
            b"n\x01",
            b"v",
            b"x",
            b"jmx",
            b"",
        ] {
            assert_eq!(StateKey::decode(k), None, "{k:?}");
        }
    }

    #[test]
    fn values_load_back_into_an_equal_state() {
        let mut s = crate::state::fixtures::cluster(2, |_| Default::default());
        s.apply(&crate::state::Command::PutKv {
            key: "a".into(),
            value: "b".into(),
        });
        let mut loaded = ClusterState::default();
        for k in examples()
            .into_iter()
            .chain(s.nodes.keys().map(|id| StateKey::Node(*id)))
            .chain(s.events.keys().map(|seq| StateKey::Event(*seq)))
            .chain([StateKey::Kv("a".into())])
        {
            if let Some(v) = s.stored_value(&k).expect("encodes") {
                loaded.load_stored(&k, &v).expect("decodes");
            }
        }
        assert_eq!(loaded, s);
    }
}
