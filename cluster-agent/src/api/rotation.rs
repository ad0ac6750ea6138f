//! Automatic renewal of this node's certificate before it expires.
//!
//! The agent watches its certificate: when less than `cert_renew_percent_left` of its
//! lifetime is left (default a third), it makes a new key and signing request and asks an
//! issuer — itself when it holds the CA key, else the other members in turn — for a new
//! certificate (`RenewNodeCertificate`, authenticated by the current node certificate; the
//! issuer signs only for a current member, the same node id and IP addresses). The new
//! certificate and key replace the old ones in `tls_dir` (a crash leaves a matching pair,
//! `pki::TlsDir::store_renewal`) and in the shared credentials: every new connection and
//! every handshake of the listeners (management, peer, migration) uses them from then on;
//! connections in flight are not cut. A failed renewal is retried until the certificate
//! expires (and after: an expired certificate keeps failing handshakes, which the logs name).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use cluster_proto::management::management_service_client::ManagementServiceClient;
use cluster_proto::management::RenewNodeCertificateRequest;
use cluster_proto::pki::{self, Identity, TlsDir};
use tokio::sync::watch;

use crate::node::credentials::Credentials;
use crate::node::Agent;

/// How often a node not recorded yet looks again whether its registration is current.
const REGISTRATION_RETRY: Duration = Duration::from_secs(2);
/// How long one renewal call to an issuer may take.
pub const RENEW_CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a renewal failed (it is retried).
#[derive(Debug, thiserror::Error)]
pub enum RenewError {
    #[error("this node's certificate is unreadable")]
    Certificate(#[source] pki::PkiError),
    #[error("cannot make a new key")]
    Key(#[source] pki::PkiError),
    #[error("no issuer signed: {0}")]
    NoIssuer(String),
    #[error("the issuer's certificate is not usable: {0}")]
    Bad(String),
    #[error("cannot store the new certificate")]
    Store(#[source] pki::PkiError),
}

/// When the certificate in `cert_pem` should be renewed, and its lifetime.
pub fn renewal_time(
    cert_pem: &str,
    percent_left: u64,
) -> Result<(SystemTime, Duration), pki::PkiError> {
    let der = pki::certificates_der(cert_pem)
        .into_iter()
        .next()
        .ok_or(pki::PkiError::NoIdentity)?;
    let (from, until) = (pki::not_before(&der)?, pki::not_after(&der)?);
    let life = until.duration_since(from).unwrap_or_default();
    let left = life.mul_f64(percent_left as f64 / 100.0);
    Ok((until.checked_sub(left).unwrap_or(from), life))
}

/// Record this node's current registration (certificate expiry, migration transport)
/// when the replicated one differs and this node is a member; `false` when that could not
/// be done now.
pub(crate) async fn sync_registration(agent: &Agent) -> bool {
    let reg = agent.registration();
    let stored = agent.read_sm(|d| {
        d.state
            .nodes
            .get(&agent.node_id())
            .map(|n| n.registration.clone())
    });
    match stored {
        // Not a member (yet): the join records the registration.
        None => true,
        Some(s) if s == reg => true,
        Some(_) => {
            let cmd = crate::state::Command::RegisterNode {
                registration: reg,
                at_unix_ms: crate::node::now_unix_ms(),
            };
            match agent.write(crate::node::ForwardRequest::Command(cmd)).await {
                Ok(_) => true,
                Err(e) => {
                    tracing::debug!(error = %e, "registration not refreshed yet");
                    false
                }
            }
        }
    }
}

/// Renew when due, until `stop` flips; keep the registration's certificate expiry
/// current.
pub async fn run(agent: Arc<Agent>, mut stop: watch::Receiver<bool>) {
    let mut synced = false;
    loop {
        let (at, life) = match renewal_time(
            &agent.credentials().cert_pem,
            agent.config().cert_renew_percent_left,
        ) {
            Ok(t) => t,
            Err(e) => {
                tracing::error!(error = %crate::error_chain(&e), "this node's certificate is unreadable; no renewal");
                return;
            }
        };
        let mut wait = at
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO);
        if !synced {
            synced = sync_registration(&agent).await;
            if !synced || agent.read_sm(|d| !d.state.nodes.contains_key(&agent.node_id())) {
                // Not recorded yet (no leader, or not joined): look again soon.
                synced = false;
                wait = wait.min(REGISTRATION_RETRY);
            }
        }
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            _ = tokio::time::sleep(wait) => {}
        }
        if SystemTime::now() < at {
            continue;
        }
        match renew(&agent).await {
            Ok(until) => {
                synced = sync_registration(&agent).await;
                tracing::info!(
                    valid_until = %pki::utc(pki::unix_ms(until)),
                    "node certificate renewed"
                );
            }
            Err(e) => {
                let retry = (life / 20).clamp(Duration::from_millis(500), Duration::from_secs(60));
                tracing::warn!(error = %crate::error_chain(&e), retry_ms = retry.as_millis() as u64, "node certificate renewal failed");
                tokio::select! {
                    _ = stop.wait_for(|s| *s) => return,
                    _ = tokio::time::sleep(retry) => {}
                }
            }
        }
    }
}

/// Ask `addr` (a member's management address) to renew.
async fn ask(agent: &Agent, addr: &str, csr_pem: &str) -> Result<(String, String), String> {
    let ch = crate::api::forward::channel(agent, addr, "an issuer")
        .await
        .map_err(|s| s.message().to_owned())?;
    let mut c = ManagementServiceClient::new(ch);
    let call = c.renew_node_certificate(RenewNodeCertificateRequest {
        csr_pem: csr_pem.to_owned(),
    });
    match tokio::time::timeout(RENEW_CALL_TIMEOUT, call).await {
        Ok(Ok(r)) => {
            let r = r.into_inner();
            Ok((r.cert_pem, r.ca_pem))
        }
        Ok(Err(s)) => Err(format!("{:?}: {}", s.code(), s.message())),
        Err(_) => Err("timed out".into()),
    }
}

/// One renewal: a new key, a certificate for it, stored and in use. Returns the new
/// certificate's expiry.
pub async fn renew(agent: &Agent) -> Result<SystemTime, RenewError> {
    let current = agent.credentials();
    let me = agent.node_id();
    let current_der = pki::certificates_der(&current.cert_pem)
        .into_iter()
        .next()
        .ok_or(RenewError::Certificate(pki::PkiError::NoIdentity))?;
    let (key_pem, csr_pem) = tokio::task::spawn_blocking(pki::new_key_and_request)
        .await
        .map_err(|e| RenewError::NoIssuer(format!("key generation task: {e}")))?
        .map_err(RenewError::Key)?;
    let dir = TlsDir(agent.config().tls_dir.clone());
    let (cert_pem, ca_pem) = if dir.has_ca_key() {
        let d = dir.clone();
        let ca = tokio::task::spawn_blocking(move || d.load_ca())
            .await
            .map_err(|e| RenewError::NoIssuer(format!("loading the CA: {e}")))?
            .map_err(|e| RenewError::NoIssuer(crate::error_chain(&e)))?;
        let cert = crate::api::certificates::sign_renewal(agent, &ca, me, &current_der, &csr_pem)
            .map_err(|s| RenewError::NoIssuer(format!("this node: {}", s.message())))?;
        (cert, ca.cert_pem().to_owned())
    } else {
        let members: Vec<(u64, String)> = agent.read_sm(|d| {
            d.state
                .nodes
                .values()
                .filter(|n| n.registration.node_id != me)
                .map(|n| (n.registration.node_id, n.registration.mgmt_addr.clone()))
                .collect()
        });
        let mut refusals = Vec::new();
        let mut signed = None;
        for (id, addr) in members {
            match ask(agent, &addr, &csr_pem).await {
                Ok(r) => {
                    signed = Some(r);
                    break;
                }
                Err(e) => refusals.push(format!("node {id}: {e}")),
            }
        }
        signed.ok_or_else(|| {
            RenewError::NoIssuer(if refusals.is_empty() {
                "no other member to ask".into()
            } else {
                refusals.join("; ")
            })
        })?
    };
    // Check what came back before anything is replaced: issued by a CA this node
    // trusts, and by the cluster's issuing CA once it was rotated (the issuer may not
    // hold the new CA key yet: try again later).
    let _ = ca_pem;
    let der = pki::certificates_der(&cert_pem)
        .into_iter()
        .next()
        .ok_or_else(|| RenewError::Bad("no certificate in the answer".into()))?;
    let Some(issuer) = pki::issuer_in(&der, &current.ca_pem) else {
        return Err(RenewError::Bad(
            "it was issued by a CA this node does not trust".into(),
        ));
    };
    if let Some(want) =
        agent.read_sm(|d| d.state.ca.as_ref().map(|c| c.current.fingerprint.clone()))
    {
        if issuer != want {
            return Err(RenewError::Bad(format!(
                "it was issued by CA {}, not by the cluster's issuing CA {} (the issuer has not \
                 switched to the new CA key yet)",
                crate::state::ca::short(&issuer),
                crate::state::ca::short(&want)
            )));
        }
    }
    match pki::identity_of(&der) {
        Ok(Identity::Node(id)) if id == me => {}
        other => {
            return Err(RenewError::Bad(format!(
                "it names {other:?}, not node {me}"
            )))
        }
    }
    let until = pki::not_after(&der).map_err(|e| RenewError::Bad(e.to_string()))?;
    let new = crate::api::tls::with_issuer(Credentials {
        ca_pem: current.ca_pem.clone(),
        cert_pem,
        key_pem,
        expires_unix_ms: pki::unix_ms(until),
        cert_ca_sha256: String::new(),
        retired_ca_pem: current.retired_ca_pem.clone(),
    });
    crate::api::tls::check_credentials(&new)
        .map_err(|e| RenewError::Bad(crate::error_chain(&e)))?;
    let (c, k) = (new.cert_pem.clone(), new.key_pem.clone());
    tokio::task::spawn_blocking(move || dir.store_renewal(&c, &k))
        .await
        .map_err(|e| RenewError::Bad(format!("storing task: {e}")))?
        .map_err(RenewError::Store)?;
    agent.shared_credentials().replace(new);
    Ok(until)
}
