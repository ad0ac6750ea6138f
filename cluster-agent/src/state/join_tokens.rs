//! Join tokens: one-time, expiring secrets that let a new host get a node certificate
//! (`clusterctl cluster token create --ttl 1h`, then `clusterctl pki join`). The table
//! keeps a token's id, the SHA-256 of its secret (never the secret), its expiry and who
//! used it; consuming a token is a committed command, so two hosts can never both use
//! one, whichever agents they ask.
//!
//! **Architecture Invariant:** pure and deterministic: every time comes in the command
//! (the proposer's clock), nothing here reads a clock or does I/O.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::state::{ClusterState, EventKind, StateKey};

/// Tokens kept at most (expired and used ones are dropped first when a new one comes).
pub const JOIN_TOKENS_MAX: usize = 64;
/// Longest lifetime a token may be given.
pub const JOIN_TOKEN_TTL_MAX_MS: u64 = 7 * 24 * 3_600_000;

/// One token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinToken {
    /// SHA-256 of the secret, hex.
    pub secret_sha256: String,
    pub created_unix_ms: u64,
    pub expires_unix_ms: u64,
    /// The node that used it (a token is good once).
    pub used_by: Option<u64>,
}

/// The table, by token id.
pub type JoinTokens = BTreeMap<String, JoinToken>;

/// A change of the token table, carried by the Raft log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "token_cmd", rename_all = "snake_case")]
pub enum TokenCommand {
    Create {
        id: String,
        secret_sha256: String,
        expires_unix_ms: u64,
        at_unix_ms: u64,
    },
    /// Use token `id` for node `node_id`, proving the secret by its hash.
    Consume {
        id: String,
        secret_sha256: String,
        node_id: u64,
        at_unix_ms: u64,
    },
}

impl std::fmt::Display for TokenCommand {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TokenCommand::Create { id, .. } => write!(f, "create_join_token({id})"),
            TokenCommand::Consume { id, node_id, .. } => {
                write!(f, "consume_join_token({id}, node {node_id})")
            }
        }
    }
}

/// Why a token command is refused (nothing changes).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("join token {0:?} already exists")]
    Exists(String),
    #[error("the join token's lifetime must be 1 s to 7 days")]
    BadTtl,
    #[error("join token {0:?} is unknown (mistyped, or created on another cluster)")]
    Unknown(String),
    #[error("join token {0:?} does not match its secret")]
    WrongSecret(String),
    #[error("join token {0:?} expired; create a new one (`clusterctl cluster token create`)")]
    Expired(String),
    #[error("join token {id:?} was already used by node {node}; a token is good once")]
    Used { id: String, node: u64 },
}

/// Whether token `id` may be used now with the secret whose hash is `secret_sha256` (what
/// `Consume` checks; an agent asks it of its replica first, so a caller without a valid
/// token never causes a Raft write).
pub fn check(
    tokens: &JoinTokens,
    id: &str,
    secret_sha256: &str,
    now_unix_ms: u64,
) -> Result<(), TokenError> {
    let t = tokens
        .get(id)
        .ok_or_else(|| TokenError::Unknown(id.to_owned()))?;
    if t.secret_sha256 != secret_sha256 {
        return Err(TokenError::WrongSecret(id.to_owned()));
    }
    if let Some(node) = t.used_by {
        return Err(TokenError::Used {
            id: id.to_owned(),
            node,
        });
    }
    if t.expires_unix_ms <= now_unix_ms {
        return Err(TokenError::Expired(id.to_owned()));
    }
    Ok(())
}

/// Apply a token command to `s`, recording what it touched.
pub fn apply(
    s: &mut ClusterState,
    cmd: &TokenCommand,
    touched: &mut Vec<StateKey>,
) -> Result<(), TokenError> {
    match cmd {
        TokenCommand::Create {
            id,
            secret_sha256,
            expires_unix_ms,
            at_unix_ms,
        } => {
            if s.join_tokens.contains_key(id) {
                return Err(TokenError::Exists(id.clone()));
            }
            let ttl = expires_unix_ms.saturating_sub(*at_unix_ms);
            if ttl == 0 || ttl > JOIN_TOKEN_TTL_MAX_MS {
                return Err(TokenError::BadTtl);
            }
            // Make room: used and expired tokens first, then the oldest.
            s.join_tokens
                .retain(|_, t| t.used_by.is_none() && t.expires_unix_ms > *at_unix_ms);
            while s.join_tokens.len() >= JOIN_TOKENS_MAX {
                let oldest = s
                    .join_tokens
                    .iter()
                    .min_by_key(|(_, t)| t.created_unix_ms)
                    .map(|(k, _)| k.clone());
                match oldest {
                    Some(k) => s.join_tokens.remove(&k),
                    None => break,
                };
            }
            s.join_tokens.insert(
                id.clone(),
                JoinToken {
                    secret_sha256: secret_sha256.clone(),
                    created_unix_ms: *at_unix_ms,
                    expires_unix_ms: *expires_unix_ms,
                    used_by: None,
                },
            );
            touched.push(StateKey::JoinTokens);
            Ok(())
        }
        TokenCommand::Consume {
            id,
            secret_sha256,
            node_id,
            at_unix_ms,
        } => {
            check(&s.join_tokens, id, secret_sha256, *at_unix_ms)?;
            let Some(t) = s.join_tokens.get_mut(id) else {
                return Err(TokenError::Unknown(id.clone()));
            };
            t.used_by = Some(*node_id);
            touched.push(StateKey::JoinTokens);
            s.record_event(
                *at_unix_ms,
                EventKind::NodeCertificateIssued,
                *node_id,
                format!("join token {id} used: node {node_id} was issued a certificate"),
                touched,
            );
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn create(id: &str, at: u64, ttl: u64) -> TokenCommand {
        TokenCommand::Create {
            id: id.into(),
            secret_sha256: format!("h-{id}"),
            expires_unix_ms: at + ttl,
            at_unix_ms: at,
        }
    }

    fn consume(id: &str, secret: &str, node: u64, at: u64) -> TokenCommand {
        TokenCommand::Consume {
            id: id.into(),
            secret_sha256: secret.into(),
            node_id: node,
            at_unix_ms: at,
        }
    }

    #[test]
    fn a_token_is_good_once_before_it_expires_with_its_secret() {
        let mut s = ClusterState::default();
        let mut t = Vec::new();
        apply(&mut s, &create("a", 1_000, 60_000), &mut t).unwrap();
        assert_eq!(
            apply(&mut s, &create("a", 1_000, 60_000), &mut t),
            Err(TokenError::Exists("a".into()))
        );
        assert_eq!(
            apply(&mut s, &consume("a", "wrong", 4, 2_000), &mut t),
            Err(TokenError::WrongSecret("a".into()))
        );
        assert_eq!(
            apply(&mut s, &consume("b", "h-b", 4, 2_000), &mut t),
            Err(TokenError::Unknown("b".into()))
        );
        apply(&mut s, &consume("a", "h-a", 4, 2_000), &mut t).unwrap();
        assert_eq!(
            apply(&mut s, &consume("a", "h-a", 5, 3_000), &mut t),
            Err(TokenError::Used {
                id: "a".into(),
                node: 4
            })
        );
        apply(&mut s, &create("c", 1_000, 1_000), &mut t).unwrap();
        assert_eq!(
            apply(&mut s, &consume("c", "h-c", 6, 2_000), &mut t),
            Err(TokenError::Expired("c".into()))
        );
        assert_eq!(
            apply(&mut s, &create("d", 1_000, 0), &mut t),
            Err(TokenError::BadTtl)
        );
    }

    #[test]
    fn the_table_stays_bounded() {
        let mut s = ClusterState::default();
        let mut t = Vec::new();
        for i in 0..(JOIN_TOKENS_MAX as u64 * 2) {
            apply(&mut s, &create(&format!("t{i}"), 1_000 + i, 60_000), &mut t).unwrap();
        }
        assert_eq!(s.join_tokens.len(), JOIN_TOKENS_MAX);
        // The newest survive.
        assert!(s
            .join_tokens
            .contains_key(&format!("t{}", JOIN_TOKENS_MAX * 2 - 1)));
    }
}
