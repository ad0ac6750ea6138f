//! Console logins and sessions, in this agent's memory: a one-time login token issued
//! over the authenticated gRPC API (`ConsoleLogin`) is exchanged once for a session
//! cookie. Both are 256-bit random values; only their SHA-256 is kept as the map key, so
//! a lookup takes no time that depends on how much of a guess was right. Time is the
//! caller's `now_ms` (no clock here).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cluster_proto::pki::{self, Role};
use rand::RngCore;

/// How long a login link is good for.
pub const LOGIN_TOKEN_TTL_MS: u64 = 60_000;
/// Login tokens waiting to be used; more are refused until some expire or are used.
pub const LOGIN_TOKENS_MAX: usize = 256;
/// How long a session lasts (never past the user certificate's expiry).
pub const SESSION_TTL_MS: u64 = 8 * 3_600_000;
/// Sessions kept; past it the one that expires first is ended.
pub const SESSIONS_MAX: usize = 1_024;

/// Who a login token or a session speaks for: the user certificate that asked for the
/// login (kept so every request checks it against the revocation list again).
#[derive(Debug)]
pub struct Session {
    pub name: String,
    pub role: Role,
    pub cert_der: Vec<u8>,
    /// When that certificate expires: no session outlives it.
    pub cert_expires_unix_ms: u64,
    /// Sent by the page in a header with every write (see the module docs of `console`).
    pub csrf: String,
    pub expires_unix_ms: u64,
}

/// Why a login token was not issued.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LoginError {
    #[error(
        "{LOGIN_TOKENS_MAX} console login links are waiting to be used; try again in a minute"
    )]
    TooMany,
}

#[derive(Default)]
struct Inner {
    tokens: HashMap<String, Session>,
    sessions: HashMap<String, Arc<Session>>,
}

/// See the module docs.
#[derive(Default)]
pub struct Sessions {
    inner: Mutex<Inner>,
}

fn random_hex() -> String {
    let mut b = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn key(secret: &str) -> String {
    pki::sha256_hex(secret.as_bytes())
}

/// `a == b` in a time that depends only on the lengths.
pub fn same_secret(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

impl Sessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A one-time login token for the user `name` with `role`, whose certificate is
    /// `cert_der` and expires at `cert_expires_unix_ms`; with its expiry.
    pub fn issue(
        &self,
        name: &str,
        role: Role,
        cert_der: &[u8],
        cert_expires_unix_ms: u64,
        now_ms: u64,
    ) -> Result<(String, u64), LoginError> {
        let mut inner = self.lock();
        inner.tokens.retain(|_, s| s.expires_unix_ms > now_ms);
        if inner.tokens.len() >= LOGIN_TOKENS_MAX {
            return Err(LoginError::TooMany);
        }
        let token = random_hex();
        let expires = (now_ms + LOGIN_TOKEN_TTL_MS).min(cert_expires_unix_ms);
        inner.tokens.insert(
            key(&token),
            Session {
                name: name.to_owned(),
                role,
                cert_der: cert_der.to_vec(),
                cert_expires_unix_ms,
                csrf: String::new(),
                // Until redeemed: the token's expiry; the session's is set on redeem.
                expires_unix_ms: expires,
            },
        );
        Ok((token, expires))
    }

    /// Exchange a login token (once) for a new session: its id and the session; `None`
    /// when the token is unknown, used or expired.
    pub fn redeem(&self, token: &str, now_ms: u64) -> Option<(String, Arc<Session>)> {
        let mut inner = self.lock();
        let pending = inner.tokens.remove(&key(token))?;
        if pending.expires_unix_ms <= now_ms {
            return None;
        }
        inner.sessions.retain(|_, s| s.expires_unix_ms > now_ms);
        if inner.sessions.len() >= SESSIONS_MAX {
            let first = inner
                .sessions
                .iter()
                .min_by_key(|(_, s)| s.expires_unix_ms)
                .map(|(k, _)| k.clone());
            if let Some(k) = first {
                inner.sessions.remove(&k);
            }
        }
        let id = random_hex();
        let session = Arc::new(Session {
            csrf: random_hex(),
            expires_unix_ms: (now_ms + SESSION_TTL_MS).min(pending.cert_expires_unix_ms),
            ..pending
        });
        inner.sessions.insert(key(&id), session.clone());
        Some((id, session))
    }

    /// The live session with id `id`.
    pub fn get(&self, id: &str, now_ms: u64) -> Option<Arc<Session>> {
        let inner = self.lock();
        inner
            .sessions
            .get(&key(id))
            .filter(|s| s.expires_unix_ms > now_ms)
            .cloned()
    }

    /// End session `id` (logout).
    pub fn end(&self, id: &str) {
        self.lock().sessions.remove(&key(id));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_is_good_once_and_only_before_it_expires() {
        let s = Sessions::default();
        let (t, exp) = s
            .issue("ann", Role::Viewer, b"der", u64::MAX, 1_000)
            .unwrap();
        assert_eq!(exp, 1_000 + LOGIN_TOKEN_TTL_MS);
        assert!(s.redeem("nope", 1_001).is_none());
        let (id, sess) = s.redeem(&t, 1_001).unwrap();
        assert_eq!((sess.name.as_str(), sess.role), ("ann", Role::Viewer));
        assert!(s.redeem(&t, 1_002).is_none(), "used twice");
        assert!(s.get(&id, 1_002).is_some());
        assert!(s.get(&id, 1_001 + SESSION_TTL_MS).is_none(), "expired");
        let (late, _) = s.issue("bob", Role::Admin, b"der", u64::MAX, 0).unwrap();
        assert!(s.redeem(&late, LOGIN_TOKEN_TTL_MS).is_none());
        // A session never outlives the certificate it came from.
        let (t, _) = s.issue("cy", Role::Admin, b"der", 50_000, 0).unwrap();
        let (id, sess) = s.redeem(&t, 10).unwrap();
        assert_eq!(sess.expires_unix_ms, 50_000);
        assert!(s.get(&id, 50_000).is_none());
        s.end(&id);
    }

    #[test]
    fn pending_tokens_and_sessions_are_bounded() {
        let s = Sessions::default();
        for _ in 0..LOGIN_TOKENS_MAX {
            s.issue("a", Role::Admin, b"d", u64::MAX, 0).unwrap();
        }
        assert_eq!(
            s.issue("a", Role::Admin, b"d", u64::MAX, 0),
            Err(LoginError::TooMany)
        );
        // Expired ones make room.
        assert!(s
            .issue("a", Role::Admin, b"d", u64::MAX, LOGIN_TOKEN_TTL_MS)
            .is_ok());
        assert!(same_secret("abc", "abc") && !same_secret("abc", "abd") && !same_secret("a", "ab"));
        // Past SESSIONS_MAX live sessions, the one that expires first ends.
        let s = Sessions::default();
        let ids: Vec<String> = (0..=SESSIONS_MAX as u64)
            .map(|now| {
                let (t, _) = s.issue("a", Role::Admin, b"d", u64::MAX, now).unwrap();
                s.redeem(&t, now).unwrap().0
            })
            .collect();
        let now = SESSIONS_MAX as u64;
        assert!(s.get(&ids[0], now).is_none(), "the oldest was ended");
        assert!(ids[1..].iter().all(|id| s.get(id, now).is_some()));
    }
}
