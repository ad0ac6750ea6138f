//! Revoked user certificates: the replicated list every agent's management listener
//! checks on each call (`api::auth`). Two kinds of entries:
//!
//! - **one certificate**, by the SHA-256 of its DER encoding (`clusterctl user revoke
//!   --cert FILE`): exactly that certificate is refused;
//! - **a user name** (`clusterctl user revoke NAME`): every certificate naming user NAME
//!   whose validity starts before the revocation is refused. Certificates are back-dated
//!   one minute when issued, so one issued in the minute after a name's revocation is
//!   refused too; one issued later is accepted (a new certificate for the same person).
//!
//! A node removed from the cluster gets a name entry too (`node N`, which no user name can
//! be: user names have no space): its certificates issued before the removal are refused
//! on the management plane (the peer plane refuses every non-member anyway), so a removed
//! node can neither act with its node role nor register itself again; a new certificate
//! (issued after the removal, e.g. with a join token) is accepted.
//!
//! The list is bounded ([`REVOCATIONS_MAX`]); an entry whose certificates have all
//! expired anyway is dropped to make room, and a revocation that finds no room is
//! refused with the cap named (never an older revocation silently forgotten).
//!
//! **Architecture Invariant:** pure and deterministic: every time comes in the command
//! (the proposer's clock), nothing here reads a clock or does I/O.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::state::{ClusterState, EventKind, StateKey};

/// Entries kept at most.
pub const REVOCATIONS_MAX: usize = 1_024;
/// Longest user name an entry may carry (as `cluster_proto::pki::USER_NAME_LEN_MAX`).
pub const REVOKED_NAME_LEN_MAX: usize = 64;
/// Longest "by" (who revoked) kept.
pub const REVOKED_BY_LEN_MAX: usize = 160;

/// One revocation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocation {
    /// The user the revoked certificate(s) name.
    pub user: String,
    /// The role the revoked certificate names ("" for a name revocation: every role).
    #[serde(default)]
    pub role: String,
    /// SHA-256 (hex) of the one certificate revoked; `None`: every certificate of `user`
    /// whose validity starts before `at_unix_ms`.
    pub cert_sha256: Option<String>,
    /// When the revoked certificate(s) stop being valid anyway: after it the entry may
    /// be dropped to make room.
    pub expires_unix_ms: u64,
    pub at_unix_ms: u64,
    /// Who revoked (the caller's identity, as text).
    pub by: String,
}

impl Revocation {
    /// The table key: the certificate's hash, or the user name.
    pub fn key(&self) -> String {
        match &self.cert_sha256 {
            Some(h) => format!("sha256:{h}"),
            None => format!("user:{}", self.user),
        }
    }

    /// What is revoked, for messages.
    pub fn what(&self) -> String {
        if self.cert_sha256.is_none() && self.user.starts_with("node ") {
            return format!(
                "every certificate of {} issued before its removal from the cluster",
                self.user
            );
        }
        match &self.cert_sha256 {
            Some(h) => format!(
                "the certificate {} of user {:?}",
                &h[..h.len().min(16)],
                self.user
            ),
            None => format!("every certificate of user {:?}", self.user),
        }
    }
}

/// The list, by [`Revocation::key`].
pub type Revocations = BTreeMap<String, Revocation>;

/// A change of the list, carried by the Raft log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "revocation_cmd", rename_all = "snake_case")]
pub enum RevocationCommand {
    Revoke(Revocation),
}

impl std::fmt::Display for RevocationCommand {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RevocationCommand::Revoke(r) => write!(f, "revoke({})", r.key()),
        }
    }
}

/// Why a revocation is refused (nothing changes).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RevocationError {
    #[error("{what} is already revoked (since unix ms {at_unix_ms}, by {by})")]
    Already {
        what: String,
        at_unix_ms: u64,
        by: String,
    },
    #[error("the revocation list is full ({REVOCATIONS_MAX} entries whose certificates have not expired yet); nothing was revoked")]
    Full,
    #[error("bad revocation: {0}")]
    Bad(String),
}

fn is_hex_sha256(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn validate(r: &Revocation) -> Result<(), RevocationError> {
    let bad = |m: &str| Err(RevocationError::Bad(m.to_owned()));
    if r.user.is_empty() || r.user.len() > REVOKED_NAME_LEN_MAX {
        return bad("the user name must be 1 to 64 bytes");
    }
    if r.by.len() > REVOKED_BY_LEN_MAX || r.role.len() > 16 {
        return bad("who revoked (or the role) is too long");
    }
    if let Some(h) = &r.cert_sha256 {
        if !is_hex_sha256(h) {
            return bad("a certificate hash is 64 lowercase hex digits (SHA-256)");
        }
    }
    Ok(())
}

/// The entry that revokes a certificate of user `user` with DER hash `cert_sha256`
/// whose validity starts at `not_before_unix_ms`, if any.
pub fn revoked<'a>(
    list: &'a Revocations,
    user: &str,
    cert_sha256: &str,
    not_before_unix_ms: u64,
) -> Option<&'a Revocation> {
    if list.is_empty() {
        return None;
    }
    if let Some(r) = list.get(&format!("sha256:{cert_sha256}")) {
        return Some(r);
    }
    list.get(&format!("user:{user}"))
        .filter(|r| not_before_unix_ms < r.at_unix_ms)
}

/// Whether a name revocation exists for `user` (the caller then needs the certificate's
/// start of validity to decide).
pub fn has_name_entry(list: &Revocations, user: &str) -> bool {
    !list.is_empty() && list.contains_key(&format!("user:{user}"))
}

/// When the list is full, drops the entries whose certificates have all expired by
/// `now_unix_ms` (they protect nothing any more).
fn drop_expired_when_full(s: &mut ClusterState, now_unix_ms: u64) {
    if s.revocations.len() >= REVOCATIONS_MAX {
        s.revocations.retain(|_, e| e.expires_unix_ms > now_unix_ms);
    }
}

/// The name entry under which the certificates of node `node_id` are revoked.
pub fn node_entry(node_id: u64) -> String {
    format!("node {node_id}")
}

/// How long after a node's removal its entry is kept: the longest validity a node
/// certificate can have (10 years), so every certificate it held has expired by then.
pub const REMOVED_NODE_ENTRY_MS: u64 = 10 * 365 * 86_400 * 1000;

/// Node `node_id` was removed at `at_unix_ms`: refuse its certificates issued before.
/// Never refused for lack of room (a removal must take effect): expired entries are
/// dropped first, and the list may then exceed [`REVOCATIONS_MAX`] by removed nodes.
pub fn revoke_removed_node(
    s: &mut ClusterState,
    node_id: u64,
    at_unix_ms: u64,
    touched: &mut Vec<StateKey>,
) {
    let r = Revocation {
        user: node_entry(node_id),
        role: String::new(),
        cert_sha256: None,
        expires_unix_ms: at_unix_ms.saturating_add(REMOVED_NODE_ENTRY_MS),
        at_unix_ms,
        by: "its removal from the cluster".into(),
    };
    drop_expired_when_full(s, at_unix_ms);
    // A node removed again (re-added with a new certificate in between): the newer time.
    s.revocations.insert(r.key(), r);
    touched.push(StateKey::Revocations);
}

/// Apply a revocation command to `s`, recording what it touched.
pub fn apply(
    s: &mut ClusterState,
    cmd: &RevocationCommand,
    touched: &mut Vec<StateKey>,
) -> Result<(), RevocationError> {
    match cmd {
        RevocationCommand::Revoke(r) => {
            validate(r)?;
            let key = r.key();
            if let Some(old) = s.revocations.get(&key) {
                return Err(RevocationError::Already {
                    what: old.what(),
                    at_unix_ms: old.at_unix_ms,
                    by: old.by.clone(),
                });
            }
            drop_expired_when_full(s, r.at_unix_ms);
            if s.revocations.len() >= REVOCATIONS_MAX {
                return Err(RevocationError::Full);
            }
            s.revocations.insert(key, r.clone());
            touched.push(StateKey::Revocations);
            s.record_event(
                r.at_unix_ms,
                EventKind::CertificateRevoked,
                0,
                format!("{} revoked by {}", r.what(), r.by),
                touched,
            );
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn by_name(user: &str, at: u64) -> Revocation {
        Revocation {
            user: user.into(),
            role: String::new(),
            cert_sha256: None,
            expires_unix_ms: at + 1_000_000,
            at_unix_ms: at,
            by: "user \"admin\" (admin)".into(),
        }
    }

    fn by_hash(user: &str, h: char, at: u64, expires: u64) -> Revocation {
        Revocation {
            user: user.into(),
            role: "viewer".into(),
            cert_sha256: Some(h.to_string().repeat(64)),
            expires_unix_ms: expires,
            at_unix_ms: at,
            by: "admin".into(),
        }
    }

    #[test]
    fn a_removed_nodes_earlier_certificates_are_refused_and_later_ones_are_not() {
        let mut s = ClusterState::default();
        let mut t = Vec::new();
        revoke_removed_node(&mut s, 4, 50_000, &mut t);
        assert!(t.contains(&StateKey::Revocations));
        let r = revoked(&s.revocations, &node_entry(4), "ab", 49_000).expect("refused");
        assert!(
            r.what().contains("node 4 issued before its removal"),
            "{}",
            r.what()
        );
        assert!(revoked(&s.revocations, &node_entry(4), "ab", 51_000).is_none());
        assert!(revoked(&s.revocations, &node_entry(5), "ab", 1).is_none());
        // Removed again later: the newer removal counts.
        revoke_removed_node(&mut s, 4, 90_000, &mut t);
        assert!(revoked(&s.revocations, &node_entry(4), "ab", 51_000).is_some());
    }

    #[test]
    fn a_revoked_certificate_or_name_is_found_and_others_are_not() {
        let mut s = ClusterState::default();
        let mut t = Vec::new();
        apply(
            &mut s,
            &RevocationCommand::Revoke(by_name("bob", 10_000)),
            &mut t,
        )
        .unwrap();
        assert!(t.contains(&StateKey::Revocations));
        apply(
            &mut s,
            &RevocationCommand::Revoke(by_hash("carol", 'a', 10_000, 99_000)),
            &mut t,
        )
        .unwrap();
        let l = &s.revocations;
        // bob's certificates from before the revocation; not one issued later.
        assert!(revoked(l, "bob", &"0".repeat(64), 9_999).is_some());
        assert!(revoked(l, "bob", &"0".repeat(64), 10_000).is_none());
        // carol's one certificate, not her others; nobody else.
        assert!(revoked(l, "carol", &"a".repeat(64), 0).is_some());
        assert!(revoked(l, "carol", &"b".repeat(64), 0).is_none());
        assert!(revoked(l, "dave", &"0".repeat(64), 0).is_none());
        assert!(has_name_entry(l, "bob") && !has_name_entry(l, "carol"));
    }

    #[test]
    fn revoking_twice_or_badly_is_refused_without_change() {
        let mut s = ClusterState::default();
        let mut t = Vec::new();
        let cmd = RevocationCommand::Revoke(by_name("bob", 10));
        apply(&mut s, &cmd, &mut t).unwrap();
        let before = s.clone();
        let mut t = Vec::new();
        let e = apply(&mut s, &cmd, &mut t).unwrap_err();
        assert!(
            e.to_string()
                .contains("every certificate of user \"bob\" is already revoked"),
            "{e}"
        );
        let mut bad = by_hash("x", 'a', 1, 2);
        bad.cert_sha256 = Some("nothex".into());
        assert!(matches!(
            apply(&mut s, &RevocationCommand::Revoke(bad), &mut t),
            Err(RevocationError::Bad(_))
        ));
        assert!(matches!(
            apply(&mut s, &RevocationCommand::Revoke(by_name("", 1)), &mut t),
            Err(RevocationError::Bad(_))
        ));
        assert_eq!(s, before);
        assert!(t.is_empty());
    }

    #[test]
    fn the_list_is_bounded_expired_entries_make_room_and_live_ones_are_kept() {
        let mut s = ClusterState::default();
        let mut t = Vec::new();
        for i in 0..REVOCATIONS_MAX {
            // Half of them expire at 500, the others much later.
            let expires = if i % 2 == 0 { 500 } else { 1_000_000 };
            let mut r = by_hash(&format!("u{i}"), 'a', 100, expires);
            r.cert_sha256 = Some(format!("{i:064x}"));
            apply(&mut s, &RevocationCommand::Revoke(r), &mut t).unwrap();
        }
        assert_eq!(s.revocations.len(), REVOCATIONS_MAX);
        // Before anything expired: full, refused, nothing forgotten.
        let e = apply(
            &mut s,
            &RevocationCommand::Revoke(by_name("late", 200)),
            &mut t,
        )
        .unwrap_err();
        assert_eq!(e, RevocationError::Full);
        assert!(e.to_string().contains("1024"), "{e}");
        assert_eq!(s.revocations.len(), REVOCATIONS_MAX);
        // Later the expired half makes room.
        apply(
            &mut s,
            &RevocationCommand::Revoke(by_name("late", 600)),
            &mut t,
        )
        .unwrap();
        assert_eq!(s.revocations.len(), REVOCATIONS_MAX / 2 + 1);
        assert!(s.revocations.values().all(|r| r.expires_unix_ms > 600));
    }
}
