//! Who may call what on the management listener: a tower layer in front of every
//! management service that reads the identity the caller's certificate names (checked
//! against the cluster CA by the TLS handshake) and refuses a call its role does not
//! allow, before any service code runs.
//!
//! | caller                         | may call                                        |
//! |--------------------------------|-------------------------------------------------|
//! | no certificate                 | `grpc.health.v1.Health`, `IssueCertificate` (with a join token) |
//! | user, role `viewer`            | [`cluster_proto::READ_ONLY_METHODS`], reflection, health |
//! | user, role `admin`; any node   | everything (agents forward calls to each other) |
//!
//! A user certificate on the replicated revocation list (`crate::state::revocations`)
//! is refused on every call, whatever it calls (`Unauthenticated`, naming when and by
//! whom it was revoked), from the moment this agent applies the revocation.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use cluster_proto::pki::{self, Identity, Role};
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tonic::Status;

use crate::node::Agent;
use crate::state::revocations;

/// The caller of a management call, for the services (request extension).
#[derive(Clone, Debug)]
pub struct Caller(pub Identity);

/// The caller's certificate (DER), beside [`Caller`].
#[derive(Clone, Debug)]
pub struct CallerCertificate(pub Vec<u8>);

/// Layer that wraps the management router in [`Authorize`]; the agent's replica holds
/// the revocation list.
#[derive(Clone)]
pub struct AuthorizeLayer {
    pub agent: Arc<Agent>,
}

impl<S> tower::Layer<S> for AuthorizeLayer {
    type Service = Authorize<S>;
    fn layer(&self, inner: S) -> Authorize<S> {
        Authorize {
            inner,
            agent: self.agent.clone(),
        }
    }
}

/// See the module docs.
#[derive(Clone)]
pub struct Authorize<S> {
    inner: S,
    agent: Arc<Agent>,
}

/// Refused when the user certificate `der` naming `name` is revoked on this replica.
pub(crate) fn check_revoked(agent: &Agent, name: &str, der: &[u8]) -> Result<(), Status> {
    let found = agent.read_sm(|d| {
        let list = &d.state.revocations;
        if list.is_empty() {
            return None;
        }
        // The start of validity matters only to a revocation of the whole name.
        let not_before = if revocations::has_name_entry(list, name) {
            pki::not_before(der).map(pki::unix_ms).unwrap_or(0)
        } else {
            u64::MAX
        };
        revocations::revoked(list, name, &pki::sha256_hex(der), not_before).cloned()
    });
    match found {
        None => Ok(()),
        Some(r) => Err(Status::unauthenticated(format!(
            "this client certificate was revoked: {} was revoked at {} by {}; ask an admin \
             for a new certificate",
            r.what(),
            pki::utc(r.at_unix_ms),
            r.by
        ))),
    }
}

/// Refused when `der` was issued by the CA a finished rotation dropped (the management
/// listener lets such certificates through the handshake to say so here).
pub(crate) fn check_not_retired(agent: &Agent, der: &[u8]) -> Result<(), Status> {
    let c = agent.credentials();
    if c.retired_ca_pem.is_empty() || pki::issuer_in(der, &c.ca_pem).is_some() {
        return Ok(());
    }
    let Some(fp) = pki::issuer_in(der, &c.retired_ca_pem) else {
        return Ok(());
    };
    let finished = agent.read_sm(|d| d.state.ca.as_ref().map(|s| s.finished_at_unix_ms));
    Err(Status::unauthenticated(format!(
        "this client certificate was issued by the cluster's old CA {}, which is no longer \
         trusted (its rotation was finished at {}); ask an admin for a new certificate \
         (`clusterctl user create`) and put the current trust bundle in your CA file \
         (`clusterctl cluster ca show --pem`)",
        crate::state::ca::short(&fp),
        finished
            .map(pki::utc)
            .unwrap_or_else(|| "an unknown time".into())
    )))
}

/// Open to callers without a certificate: a new host with a join token has none yet (the
/// handler checks the token, or the admin role for a user certificate).
const ISSUE_CERTIFICATE: &str = "/cluster.management.v1.ManagementService/IssueCertificate";

/// What a call to `path` needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Needs {
    Nothing,
    Viewer,
    Admin,
}

fn needs(path: &str) -> Needs {
    if path.starts_with("/grpc.health.v1.Health/") || path == ISSUE_CERTIFICATE {
        Needs::Nothing
    } else if path.starts_with("/grpc.reflection.")
        || cluster_proto::READ_ONLY_METHODS.contains(&path)
    {
        Needs::Viewer
    } else {
        Needs::Admin
    }
}

/// The verdict on a call to `path` by `caller` (`None`: no client certificate).
pub(crate) fn decide(path: &str, caller: Option<&Identity>) -> Result<(), Status> {
    let method = path.rsplit('/').next().unwrap_or(path);
    match (needs(path), caller) {
        (Needs::Nothing, _) => Ok(()),
        (_, None) => Err(Status::unauthenticated(
            "this cluster needs a client certificate signed by its CA (clusterctl: a context \
             with --ca, --cert and --key; `clusterctl user create` issues one)",
        )),
        (_, Some(Identity::Node(_))) => Ok(()),
        (
            _,
            Some(Identity::User {
                role: Role::Admin, ..
            }),
        ) => Ok(()),
        (Needs::Viewer, Some(Identity::User { .. })) => Ok(()),
        (Needs::Admin, Some(Identity::User { name, role })) => Err(Status::permission_denied(
            format!("user {name:?} has role {role}; {method} needs role admin"),
        )),
    }
}

/// The identity the caller's certificate names, checked against the revocation list.
fn caller_of<B>(
    agent: &Agent,
    req: &http::Request<B>,
) -> Result<Option<(Identity, Vec<u8>)>, Status> {
    let Some(certs) = req
        .extensions()
        .get::<TlsConnectInfo<TcpConnectInfo>>()
        .and_then(|i| i.peer_certs())
    else {
        return Ok(None);
    };
    let Some(leaf) = certs.first() else {
        return Ok(None);
    };
    check_not_retired(agent, leaf.as_ref())?;
    let id = pki::identity_of(leaf.as_ref()).map_err(|e| {
        Status::unauthenticated(format!("the client certificate is not usable here: {e}"))
    })?;
    match &id {
        Identity::User { name, .. } => check_revoked(agent, name, leaf.as_ref())?,
        // A node removed from the cluster: its certificates from before are refused.
        Identity::Node(n) => check_revoked(
            agent,
            &crate::state::revocations::node_entry(*n),
            leaf.as_ref(),
        )?,
    }
    Ok(Some((id, leaf.as_ref().to_vec())))
}

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

impl<S, B> tower::Service<http::Request<B>> for Authorize<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let verdict = caller_of(&self.agent, &req).and_then(|caller| {
            decide(req.uri().path(), caller.as_ref().map(|(id, _)| id))?;
            Ok(caller)
        });
        match verdict {
            Ok(caller) => {
                if let Some((id, der)) = caller {
                    req.extensions_mut().insert(Caller(id));
                    req.extensions_mut().insert(CallerCertificate(der));
                }
                // The clone is ready only after poll_ready; call the one that was polled.
                let clone = self.inner.clone();
                let mut inner = std::mem::replace(&mut self.inner, clone);
                Box::pin(inner.call(req))
            }
            Err(status) => {
                tracing::info!(path = %req.uri().path(), reason = %status.message(), "management call refused");
                Box::pin(async move { Ok(status.into_http()) })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(role: Role) -> Identity {
        Identity::User {
            name: "u".into(),
            role,
        }
    }

    #[test]
    fn roles_decide_what_a_caller_may_do() {
        let write = "/cluster.vms.v1.VmService/CreateVm";
        let read = "/cluster.vms.v1.VmService/ListVms";
        let health = "/grpc.health.v1.Health/Check";
        assert!(decide(health, None).is_ok());
        assert_eq!(
            decide(read, None).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        assert!(decide(read, Some(&user(Role::Viewer))).is_ok());
        let e = decide(write, Some(&user(Role::Viewer))).unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        assert!(e.message().contains("CreateVm needs role admin"), "{e:?}");
        assert!(decide(write, Some(&user(Role::Admin))).is_ok());
        assert!(decide(write, Some(&Identity::Node(2))).is_ok());
        // Unknown paths need admin (a new write method is never open by omission).
        assert!(decide("/x.Y/Z", Some(&user(Role::Viewer))).is_err());
    }
}
