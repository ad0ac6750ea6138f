//! The cluster CA's rotation: which CA issues certificates now and which CAs every
//! plane trusts (the *trust bundle*), replicated so that every agent learns it.
//!
//! Before the first rotation there is no record: each agent trusts the `ca.pem` of its
//! `tls_dir` (the one CA the cluster was made with). A rotation (`RotateCa`) records the
//! new CA's certificate (never its key: that reaches the issuing nodes over the mutual-TLS
//! peer plane, see `api::ca`) as the issuing CA, with the old one kept trusted: every agent
//! writes the bundle to its `ca.pem` and trusts both from the next handshake on, and then
//! renews its node certificate from the new CA. `FinishCaRotation` drops the old CA from
//! the bundle; it is refused while a member still reports a node certificate of the old
//! CA (the refusal names them), so finishing never cuts a member off. User certificates of
//! the old CA stop working with the finish.
//!
//! **Architecture Invariant:** pure and deterministic: times come in the commands, the
//! PEM text is only compared and copied here (the agent checks it before proposing), and
//! no private key is ever part of a command.

use serde::{Deserialize, Serialize};

use crate::state::{ClusterState, EventKind, StateKey};

/// Largest CA certificate (PEM) a rotation may carry.
pub const CA_PEM_LEN_MAX: usize = 16 * 1024;
/// Longest "by" kept.
pub const CA_BY_LEN_MAX: usize = 160;

/// One CA of the bundle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaCert {
    /// The CA certificate (PEM).
    pub pem: String,
    /// SHA-256 of its DER encoding (hex): how the CA is named everywhere.
    pub fingerprint: String,
}

/// The replicated CA state (present once the CA was rotated).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaState {
    /// The CA that issues certificates now.
    pub current: CaCert,
    /// The CA it replaced, still trusted until the rotation is finished.
    pub previous: Option<CaCert>,
    /// When the current CA was made the issuing one, and by whom.
    pub rotated_at_unix_ms: u64,
    pub rotated_by: String,
    /// Members renew their node certificates from the current CA from this time on
    /// (time for clients to learn the bundle first).
    pub renew_from_unix_ms: u64,
    /// When the old CA was dropped (0: still in transition).
    pub finished_at_unix_ms: u64,
    /// The CA the last finished rotation dropped: no plane trusts it, but the management
    /// plane recognises its certificates to refuse them with a reason.
    #[serde(default)]
    pub retired: Option<CaCert>,
}

impl CaState {
    /// The certificates every plane trusts, current first (PEM, one after the other).
    pub fn bundle_pem(&self) -> String {
        let mut out = self.current.pem.trim_end().to_owned();
        out.push('\n');
        if let Some(p) = &self.previous {
            out.push_str(p.pem.trim_end());
            out.push('\n');
        }
        out
    }

    /// Whether both CAs are trusted (rotated, not finished).
    pub fn in_transition(&self) -> bool {
        self.previous.is_some()
    }
}

/// A change of the CA state, carried by the Raft log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "ca_cmd", rename_all = "snake_case")]
pub enum CaCommand {
    /// Make `new` the issuing CA; `old` (the CA the proposer trusted until now) stays
    /// trusted until [`CaCommand::Finish`].
    Rotate {
        new: CaCert,
        old: CaCert,
        renew_from_unix_ms: u64,
        at_unix_ms: u64,
        by: String,
    },
    /// Stop trusting the old CA.
    Finish { at_unix_ms: u64, by: String },
}

impl std::fmt::Display for CaCommand {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CaCommand::Rotate { new, .. } => {
                write!(f, "rotate_ca({})", short(&new.fingerprint))
            }
            CaCommand::Finish { .. } => write!(f, "finish_ca_rotation"),
        }
    }
}

/// The first 16 hex digits of a fingerprint (for messages).
pub fn short(fp: &str) -> &str {
    &fp[..fp.len().min(16)]
}

/// Why a CA command is refused (nothing changes).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CaError {
    #[error("a CA rotation is in progress (since unix ms {since_unix_ms}): finish it first (`clusterctl cluster ca finish`)")]
    InTransition { since_unix_ms: u64 },
    #[error("the old CA {given} named in the rotation is not the cluster's current CA {current}: the proposer's view is outdated; try again")]
    WrongOld { given: String, current: String },
    #[error("no CA rotation is in progress: nothing to finish")]
    NotInTransition,
    #[error("node(s) {nodes} still present a node certificate of the old CA {old}; wait until they renewed (`clusterctl cluster ca show` lists each node's CA), or remove them")]
    OldCertificates { nodes: String, old: String },
    #[error("bad CA rotation: {0}")]
    Bad(String),
}

fn is_hex_sha256(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn validate(c: &CaCert, what: &str) -> Result<(), CaError> {
    if c.pem.is_empty() || c.pem.len() > CA_PEM_LEN_MAX {
        return Err(CaError::Bad(format!(
            "the {what} CA certificate must be 1 to {CA_PEM_LEN_MAX} bytes of PEM"
        )));
    }
    if !is_hex_sha256(&c.fingerprint) {
        return Err(CaError::Bad(format!(
            "the {what} CA fingerprint is not 64 lowercase hex digits (SHA-256)"
        )));
    }
    Ok(())
}

/// The members whose registration reports a node certificate of the CA `fp`.
pub fn members_with_ca(s: &ClusterState, fp: &str) -> Vec<u64> {
    s.nodes
        .values()
        .filter(|n| n.registration.trust.cert_ca_sha256 == fp)
        .map(|n| n.registration.node_id)
        .collect()
}

/// Whether `cmd` would be accepted now (the leader asks before proposing).
pub fn check(s: &ClusterState, cmd: &CaCommand) -> Result<(), CaError> {
    match cmd {
        CaCommand::Rotate { new, old, by, .. } => {
            validate(new, "new")?;
            validate(old, "old")?;
            if by.len() > CA_BY_LEN_MAX {
                return Err(CaError::Bad("who rotated is too long".into()));
            }
            if new.fingerprint == old.fingerprint {
                return Err(CaError::Bad("the new CA is the old one".into()));
            }
            match &s.ca {
                Some(ca) if ca.in_transition() => Err(CaError::InTransition {
                    since_unix_ms: ca.rotated_at_unix_ms,
                }),
                Some(ca) if ca.current.fingerprint != old.fingerprint => Err(CaError::WrongOld {
                    given: short(&old.fingerprint).to_owned(),
                    current: short(&ca.current.fingerprint).to_owned(),
                }),
                _ => Ok(()),
            }
        }
        CaCommand::Finish { .. } => {
            let Some(ca) = &s.ca else {
                return Err(CaError::NotInTransition);
            };
            let Some(old) = &ca.previous else {
                return Err(CaError::NotInTransition);
            };
            let left = members_with_ca(s, &old.fingerprint);
            if !left.is_empty() {
                return Err(CaError::OldCertificates {
                    nodes: left
                        .iter()
                        .map(u64::to_string)
                        .collect::<Vec<_>>()
                        .join(", "),
                    old: short(&old.fingerprint).to_owned(),
                });
            }
            Ok(())
        }
    }
}

/// Apply a CA command to `s`, recording what it touched.
pub fn apply(
    s: &mut ClusterState,
    cmd: &CaCommand,
    touched: &mut Vec<StateKey>,
) -> Result<(), CaError> {
    check(s, cmd)?;
    match cmd {
        CaCommand::Rotate {
            new,
            old,
            renew_from_unix_ms,
            at_unix_ms,
            by,
        } => {
            let retired = s.ca.as_ref().and_then(|c| c.retired.clone());
            s.ca = Some(CaState {
                current: new.clone(),
                previous: Some(old.clone()),
                rotated_at_unix_ms: *at_unix_ms,
                rotated_by: by.clone(),
                renew_from_unix_ms: *renew_from_unix_ms,
                finished_at_unix_ms: 0,
                retired,
            });
            touched.push(StateKey::Ca);
            s.record_event(
                *at_unix_ms,
                EventKind::CaRotated,
                0,
                format!(
                    "cluster CA rotated by {by}: {} issues certificates now, {} stays trusted until the rotation is finished",
                    short(&new.fingerprint),
                    short(&old.fingerprint)
                ),
                touched,
            );
        }
        CaCommand::Finish { at_unix_ms, by } => {
            let Some(ca) = s.ca.as_mut() else {
                return Err(CaError::NotInTransition);
            };
            let old = ca
                .previous
                .clone()
                .map(|o| o.fingerprint)
                .unwrap_or_default();
            ca.retired = ca.previous.take();
            ca.finished_at_unix_ms = *at_unix_ms;
            touched.push(StateKey::Ca);
            s.record_event(
                *at_unix_ms,
                EventKind::CaRotated,
                0,
                format!(
                    "CA rotation finished by {by}: the old CA {} is no longer trusted",
                    short(&old)
                ),
                touched,
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Command;

    fn cert(n: u8) -> CaCert {
        CaCert {
            pem: format!("-----BEGIN CERTIFICATE-----\n{n}\n-----END CERTIFICATE-----\n"),
            fingerprint: format!("{:064x}", n),
        }
    }

    fn rotate(new: u8, old: u8) -> Command {
        Command::Ca(CaCommand::Rotate {
            new: cert(new),
            old: cert(old),
            renew_from_unix_ms: 10,
            at_unix_ms: 5,
            by: "admin".into(),
        })
    }

    fn finish() -> Command {
        Command::Ca(CaCommand::Finish {
            at_unix_ms: 20,
            by: "admin".into(),
        })
    }

    fn rejected(r: &crate::state::CommandResult) -> String {
        match r {
            crate::state::CommandResult::Rejected { reason } => reason.clone(),
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn a_rotation_keeps_the_old_ca_trusted_until_finished() {
        let mut s = ClusterState::default();
        assert!(rejected(&s.apply(&finish()).0).contains("no CA rotation"));
        let (r, touched) = s.apply(&rotate(2, 1));
        assert_eq!(r, crate::state::CommandResult::Ok);
        assert!(touched.contains(&StateKey::Ca));
        let ca = s.ca.clone().unwrap();
        assert!(ca.in_transition());
        assert_eq!(ca.bundle_pem().matches("BEGIN CERTIFICATE").count(), 2);
        assert!(ca.bundle_pem().starts_with(&cert(2).pem));
        // A second rotation waits for the finish.
        let before = s.clone();
        assert!(rejected(&s.apply(&rotate(3, 2)).0).contains("in progress"));
        assert_eq!(s, before);
        s.apply(&finish());
        let ca = s.ca.clone().unwrap();
        assert!(!ca.in_transition());
        assert_eq!(ca.bundle_pem(), cert(2).pem);
        assert_eq!(ca.retired, Some(cert(1)));
        // The next rotation must name the current CA as the old one.
        assert!(rejected(&s.apply(&rotate(3, 1)).0).contains("not the cluster's current CA"));
        assert_eq!(s.apply(&rotate(3, 2)).0, crate::state::CommandResult::Ok);
    }

    #[test]
    fn finish_is_refused_while_a_member_has_an_old_certificate() {
        let mut s = crate::state::fixtures::cluster(3, |_| crate::state::NodeFacts::default());
        s.apply(&rotate(2, 1));
        for n in s.nodes.values_mut() {
            n.registration.trust.cert_ca_sha256 = cert(1).fingerprint;
        }
        if let Some(n) = s.nodes.get_mut(&1) {
            n.registration.trust.cert_ca_sha256 = cert(2).fingerprint;
        }
        let before = s.clone();
        let reason = rejected(&s.apply(&finish()).0);
        assert!(reason.contains("node(s) 2, 3"), "{reason}");
        assert_eq!(s, before);
        for n in s.nodes.values_mut() {
            n.registration.trust.cert_ca_sha256 = cert(2).fingerprint;
        }
        assert_eq!(s.apply(&finish()).0, crate::state::CommandResult::Ok);
    }

    #[test]
    fn bad_rotations_are_refused() {
        let mut s = ClusterState::default();
        let mut big = cert(2);
        big.pem = "x".repeat(CA_PEM_LEN_MAX + 1);
        let mut bad_fp = cert(2);
        bad_fp.fingerprint = "XYZ".into();
        for (new, old) in [(big, cert(1)), (bad_fp, cert(1)), (cert(1), cert(1))] {
            let cmd = Command::Ca(CaCommand::Rotate {
                new,
                old,
                renew_from_unix_ms: 0,
                at_unix_ms: 0,
                by: String::new(),
            });
            assert!(rejected(&s.apply(&cmd).0).contains("bad CA rotation"));
        }
        assert_eq!(s, ClusterState::default());
    }
}
