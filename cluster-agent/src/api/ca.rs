//! Rotation of the cluster CA: the `RotateCa`, `FinishCaRotation` and `GetCa` calls,
//! the peer call that hands the new CA key to the other issuing nodes
//! ([`fetch_ca_key`]), and the loop ([`run`]) that makes this node follow the
//! replicated CA state (`crate::state::ca`).
//!
//! A rotation, step by step:
//!
//! 1. `RotateCa` (an admin, on an agent holding `ca.key`): the agent makes a new CA,
//!    writes its key beside the old one (`ca.key.<fp>`, 0600) and commits the new CA's
//!    *certificate* as the issuing CA, the old one staying trusted. No key is ever in a
//!    command, the log or a snapshot.
//! 2. Every agent, once it applied that ([`run`]): writes the bundle (new and old CA) to
//!    its `ca.pem` and uses it from the next handshake on, on every plane (the
//!    verifiers of `api::tls` read the current bundle). A node holding the old CA key
//!    replaces it by the new one: the rotating node from its own `ca.key.<fp>`, the others
//!    by asking the members in turn over the mutual-TLS peer plane (`FetchCaKey`), with a
//!    signature made with the old CA key as proof that they held it — so only the nodes
//!    that could issue before can issue after, and the key travels only inside mutual TLS
//!    between members. Then (from `renew_from`) every node renews its node certificate
//!    from the new CA (`api::rotation::renew`) and reports the new certificate's CA in
//!    its registration.
//! 3. `FinishCaRotation`: refused while a member still reports a certificate of the old
//!    CA; then every agent drops the old CA from its `ca.pem` and verifiers, and
//!    certificates of the old CA (users') are refused at the handshake.
//!
//! Clients (clusterctl contexts) need the bundle in their CA file before the members
//! renew (`clusterctl cluster ca show --bundle-out FILE`, or `--renew-after` on the
//! rotation to give them time).

use std::sync::Arc;
use std::time::Duration;

use cluster_proto::management as pb;
use cluster_proto::pki::{self, TlsDir};
use cluster_proto::raft::{FetchCaKeyRequest, FetchCaKeyResponse};
use cluster_proto::times;
use tokio::sync::watch;
use tonic::{Request, Response, Status};

use crate::api::auth::Caller;
use crate::node::{now_unix_ms, Agent, ForwardReply, ForwardRequest, WriteError};
use crate::state::ca::{self, CaCert, CaCommand};
use crate::state::{Command, CommandResult};

/// Longest `renew_after` a rotation accepts.
pub const RENEW_AFTER_MAX: Duration = Duration::from_secs(30 * 86_400);
/// How long one `FetchCaKey` call may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// How soon a step that failed (no key yet, no issuer) is tried again.
const RETRY: Duration = Duration::from_secs(2);

/// The message a node signs with a CA key to fetch the key of CA `fingerprint`.
pub fn proof_message(node_id: u64, fingerprint: &str) -> Vec<u8> {
    let mut m = b"vmcluster fetch-ca-key v1\0".to_vec();
    m.extend_from_slice(&node_id.to_be_bytes());
    m.extend_from_slice(fingerprint.as_bytes());
    m
}

/// Why this node could not follow the CA state yet (retried).
#[derive(Debug, thiserror::Error)]
pub enum FollowError {
    #[error("cannot write the trust bundle")]
    Bundle(#[source] pki::PkiError),
    #[error("cannot read or store the CA key")]
    Key(#[source] pki::PkiError),
    #[error("no member handed over the key of the new CA {fingerprint}: {reasons}")]
    NoKey {
        fingerprint: String,
        reasons: String,
    },
    #[error("cannot renew the node certificate from the new CA")]
    Renew(#[source] crate::api::rotation::RenewError),
    #[error("a background task failed: {0}")]
    Task(String),
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, FollowError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| FollowError::Task(e.to_string()))
}

fn same_pem(a: &str, b: &str) -> bool {
    pki::certificates_der(a) == pki::certificates_der(b)
}

/// Follow the replicated CA state until `stop` flips: bundle, issuing key, node
/// certificate, registration (see the module docs).
pub async fn run(agent: Arc<Agent>, mut stop: watch::Receiver<bool>) {
    let mut last_error = String::new();
    loop {
        let mut applied = crate::api::read::AppliedWatch::new(&agent);
        let wait = match follow(&agent).await {
            Ok(true) => Duration::ZERO,
            Ok(false) => {
                last_error.clear();
                Duration::from_secs(3_600)
            }
            Err(e) => {
                let text = crate::error_chain(&e);
                if text != last_error {
                    tracing::warn!(error = %text, "following the cluster CA rotation");
                    last_error = text;
                }
                RETRY
            }
        };
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            _ = applied.changed() => {}
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// One step towards the replicated CA state; `Ok(true)` when something is left to do
/// later (a renewal not due yet is retried by the caller's wait).
async fn follow(agent: &Agent) -> Result<bool, FollowError> {
    let Some(state) = agent.read_sm(|d| d.state.ca.clone()) else {
        return Ok(false);
    };
    let dir = TlsDir(agent.config().tls_dir.clone());
    // 1. The trust bundle.
    let bundle = state.bundle_pem();
    let retired = state
        .retired
        .as_ref()
        .map(|r| r.pem.clone())
        .unwrap_or_default();
    let creds = agent.credentials();
    if !same_pem(&creds.ca_pem, &bundle) || creds.retired_ca_pem != retired {
        let (d, b) = (dir.clone(), bundle.clone());
        blocking(move || d.store_ca_bundle(&b))
            .await?
            .map_err(FollowError::Bundle)?;
        let mut next = (*creds).clone();
        next.ca_pem = bundle.clone();
        next.retired_ca_pem = retired;
        agent
            .shared_credentials()
            .replace(crate::api::tls::with_issuer(next));
        tracing::info!(
            current = ca::short(&state.current.fingerprint),
            previous = state
                .previous
                .as_ref()
                .map(|p| ca::short(&p.fingerprint))
                .unwrap_or(""),
            "trust bundle updated"
        );
    }
    // 2. The issuing key, on a node that may issue.
    if dir.has_ca_key() {
        follow_key(agent, &dir, &state).await?;
    }
    // 3. The node certificate.
    let creds = agent.credentials();
    let mut pending = false;
    if creds.cert_ca_sha256 != state.current.fingerprint {
        if now_unix_ms() >= state.renew_from_unix_ms {
            let until = crate::api::rotation::renew(agent)
                .await
                .map_err(FollowError::Renew)?;
            tracing::info!(
                ca = ca::short(&state.current.fingerprint),
                valid_until = %pki::utc(pki::unix_ms(until)),
                "node certificate renewed from the new CA"
            );
        } else {
            pending = true;
        }
    }
    // 4. The registration names the certificate's CA.
    let reported = agent.read_sm(|d| {
        d.state
            .nodes
            .get(&agent.node_id())
            .map(|n| n.registration.trust.cert_ca_sha256.clone())
    });
    if reported.is_some_and(|r| r != agent.credentials().cert_ca_sha256)
        && !crate::api::rotation::sync_registration(agent).await
    {
        pending = true;
    }
    Ok(pending)
}

/// Make `ca.key` the key of the issuing CA: from a key this node made itself
/// (`ca.key.<fp>`), else from another member.
async fn follow_key(agent: &Agent, dir: &TlsDir, state: &ca::CaState) -> Result<(), FollowError> {
    let current = state.current.clone();
    let d = dir.clone();
    let bundle = state.bundle_pem();
    let held = blocking(move || {
        let key = pki::read_pem_file(&d.ca_key())?;
        Ok::<_, pki::PkiError>((pki::Ca::load(&bundle, &key).ok(), key))
    })
    .await?
    .map_err(FollowError::Key)?;
    let held_ca = match held {
        (Some(ca), _) if ca.fingerprint() == current.fingerprint => return Ok(()),
        (Some(ca), _) => ca,
        (None, _) => {
            tracing::warn!(
                "ca.key belongs to no CA the cluster trusts: this node cannot issue certificates \
                 (remove it, or give it the current CA key)"
            );
            return Ok(());
        }
    };
    // Made here by the rotation?
    let pending = dir.pending_ca_key(&current.fingerprint);
    let (p, cert) = (pending.clone(), current.pem.clone());
    let own = blocking(move || {
        if !p.exists() {
            return None;
        }
        let key = pki::read_pem_file(&p).ok()?;
        pki::Ca::load(&cert, &key).ok().map(|_| key)
    })
    .await?;
    let key_pem = match own {
        Some(k) => k,
        None => fetch_from_members(agent, &held_ca, &current).await?,
    };
    let (d, k) = (dir.clone(), key_pem);
    blocking(move || {
        d.store_ca_key_pem(&k)?;
        let _ = std::fs::remove_file(&pending);
        Ok::<_, pki::PkiError>(())
    })
    .await?
    .map_err(FollowError::Key)?;
    tracing::info!(
        ca = ca::short(&current.fingerprint),
        "this node issues certificates with the new CA"
    );
    Ok(())
}

/// Ask the members in turn for the key of CA `current`, proving with `held` (the old
/// CA's key) that this node may have it.
async fn fetch_from_members(
    agent: &Agent,
    held: &pki::Ca,
    current: &CaCert,
) -> Result<String, FollowError> {
    let me = agent.node_id();
    if agent.config().raft_insecure_plaintext {
        return Err(FollowError::NoKey {
            fingerprint: ca::short(&current.fingerprint).to_owned(),
            reasons: "the peer plane is plaintext (raft_insecure_plaintext) and a CA key never \
                      travels in the clear: copy the rotating node's ca.key to this node's \
                      tls_dir by hand (0600)"
                .into(),
        });
    }
    let proof = held
        .prove(&proof_message(me, &current.fingerprint))
        .map_err(FollowError::Key)?;
    let members: Vec<(u64, String)> = agent.read_sm(|d| {
        d.state
            .nodes
            .values()
            .filter(|n| n.registration.node_id != me)
            .map(|n| (n.registration.node_id, n.registration.raft_addr.clone()))
            .collect()
    });
    let mut reasons = Vec::new();
    for (id, addr) in members {
        let ch = match crate::api::peer::client::peer_channel(
            &agent.credentials(),
            &addr,
            FETCH_TIMEOUT,
            agent.config().raft_source_ip(),
            false,
        ) {
            Ok(c) => c,
            Err(e) => {
                reasons.push(format!("node {id}: {}", crate::error_chain(&e)));
                continue;
            }
        };
        let mut client = crate::api::peer::client::peer_client(ch);
        let call = client.fetch_ca_key(FetchCaKeyRequest {
            node_id: me,
            fingerprint: current.fingerprint.clone(),
            proof_ca_fingerprint: held.fingerprint(),
            proof: proof.clone(),
        });
        let key_pem = match tokio::time::timeout(FETCH_TIMEOUT, call).await {
            Ok(Ok(r)) => r.into_inner().key_pem,
            Ok(Err(s)) => {
                reasons.push(format!("node {id}: {:?}: {}", s.code(), s.message()));
                continue;
            }
            Err(_) => {
                reasons.push(format!("node {id}: timed out"));
                continue;
            }
        };
        match pki::Ca::load(&current.pem, &key_pem) {
            Ok(ca) if ca.fingerprint() == current.fingerprint => {
                tracing::info!(from = id, "new CA key received");
                return Ok(key_pem);
            }
            _ => reasons.push(format!(
                "node {id}: its answer is not the key of CA {}",
                ca::short(&current.fingerprint)
            )),
        }
    }
    Err(FollowError::NoKey {
        fingerprint: ca::short(&current.fingerprint).to_owned(),
        reasons: if reasons.is_empty() {
            "no other member".into()
        } else {
            reasons.join("; ")
        },
    })
}

/// The peer plane's `FetchCaKey` (the caller is a member node whose certificate names
/// `caller`; checked by the peer service before).
pub async fn fetch_ca_key(
    agent: &Agent,
    caller: u64,
    r: &FetchCaKeyRequest,
) -> Result<Response<FetchCaKeyResponse>, Status> {
    if agent.config().raft_insecure_plaintext {
        return Err(Status::failed_precondition(
            "this node's peer plane is plaintext (raft_insecure_plaintext): a CA key never \
             travels in the clear; copy it by hand",
        ));
    }
    if r.node_id != caller {
        return Err(Status::permission_denied(format!(
            "the request claims node {}, but its certificate names node {caller}",
            r.node_id
        )));
    }
    if r.proof.len() > pki::PROOF_LEN_MAX || r.fingerprint.len() > 64 {
        return Err(Status::invalid_argument(format!(
            "a proof is at most {} bytes and a fingerprint 64 hex digits",
            pki::PROOF_LEN_MAX
        )));
    }
    let Some(state) = agent.read_sm(|d| d.state.ca.clone()) else {
        return Err(Status::failed_precondition(
            "this cluster's CA was never rotated: there is no new CA key to hand out",
        ));
    };
    if state.current.fingerprint != r.fingerprint {
        return Err(Status::failed_precondition(format!(
            "CA {} is not the cluster's issuing CA ({})",
            ca::short(&r.fingerprint),
            ca::short(&state.current.fingerprint)
        )));
    }
    let trusted = [Some(&state.current), state.previous.as_ref()]
        .into_iter()
        .flatten()
        .find(|c| c.fingerprint == r.proof_ca_fingerprint);
    let proven = trusted.is_some_and(|c| {
        pki::certificates_der(&c.pem).first().is_some_and(|der| {
            pki::verify_ca_proof(der, &proof_message(caller, &r.fingerprint), &r.proof)
        })
    });
    if !proven {
        tracing::warn!(
            node = caller,
            "refused the CA key to a node that did not prove it held a CA key"
        );
        return Err(Status::permission_denied(
            "the proof is not a signature by the key of a CA this cluster trusts: only a node \
             that holds the CA key may fetch the new one",
        ));
    }
    let dir = TlsDir(agent.config().tls_dir.clone());
    let (bundle, fp) = (state.bundle_pem(), state.current.fingerprint.clone());
    let key = tokio::task::spawn_blocking(move || {
        let mut candidates = vec![dir.ca_key(), dir.pending_ca_key(&fp)];
        candidates.retain(|p| p.exists());
        candidates.into_iter().find_map(|p| {
            let key = pki::read_pem_file(&p).ok()?;
            let ca = pki::Ca::load(&bundle, &key).ok()?;
            (ca.fingerprint() == fp).then_some(key)
        })
    })
    .await
    .map_err(|e| Status::internal(format!("reading the CA key: {e}")))?;
    match key {
        Some(key_pem) => {
            tracing::info!(node = caller, "new CA key handed over");
            Ok(Response::new(FetchCaKeyResponse { key_pem }))
        }
        None => Err(Status::not_found(format!(
            "node {} does not hold the key of CA {} (yet)",
            agent.node_id(),
            ca::short(&r.fingerprint)
        ))),
    }
}

/// The CA as this agent knows it.
pub fn ca_info(agent: &Agent) -> pb::CaInfo {
    let creds = agent.credentials();
    let (state, nodes) = agent.read_sm(|d| {
        (
            d.state.ca.clone(),
            d.state
                .nodes
                .values()
                .map(|n| pb::NodeCa {
                    node_id: n.registration.node_id,
                    name: n.registration.name.clone(),
                    ca_fingerprint: n.registration.trust.cert_ca_sha256.clone(),
                })
                .collect(),
        )
    });
    let (bundle_pem, current_pem, mut info) = match &state {
        Some(s) => (
            s.bundle_pem(),
            s.current.pem.clone(),
            pb::CaInfo {
                current_fingerprint: s.current.fingerprint.clone(),
                previous_fingerprint: s
                    .previous
                    .as_ref()
                    .map(|p| p.fingerprint.clone())
                    .unwrap_or_default(),
                rotated_at: times::timestamp_from_unix_ms(s.rotated_at_unix_ms),
                rotated_by: s.rotated_by.clone(),
                renew_from: times::timestamp_from_unix_ms(s.renew_from_unix_ms),
                ..Default::default()
            },
        ),
        None => {
            let der = pki::certificates_der(&creds.ca_pem);
            (
                creds.ca_pem.clone(),
                creds.ca_pem.clone(),
                pb::CaInfo {
                    current_fingerprint: der
                        .first()
                        .map(|d| pki::fingerprint(d))
                        .unwrap_or_default(),
                    ..Default::default()
                },
            )
        }
    };
    info.bundle_pem = bundle_pem;
    info.nodes = nodes;
    info.current_expires_at = pki::certificates_der(&current_pem)
        .first()
        .and_then(|d| pki::not_after(d).ok())
        .and_then(|t| times::timestamp_from_unix_ms(pki::unix_ms(t)));
    info
}

async fn commit(agent: &Agent, cmd: CaCommand) -> Result<(), Status> {
    if let Err(e) = agent.read_sm(|d| ca::check(&d.state, &cmd)) {
        return Err(Status::failed_precondition(e.to_string()));
    }
    match agent.write(ForwardRequest::Command(Command::Ca(cmd))).await {
        Ok(ForwardReply::Command {
            result: CommandResult::Ok,
            ..
        }) => Ok(()),
        Ok(ForwardReply::Command {
            result: CommandResult::Rejected { reason },
            ..
        })
        | Err(WriteError::Rejected { reason }) => Err(Status::failed_precondition(reason)),
        Ok(other) => Err(crate::api::status::unexpected_reply(&other)),
        Err(e) => Err(e.into()),
    }
}

fn caller_name<T>(request: &Request<T>) -> String {
    request
        .extensions()
        .get::<Caller>()
        .map(|c| c.0.to_string())
        .unwrap_or_else(|| "an unknown caller".into())
}

/// `RotateCa` (admins only: the auth layer).
pub async fn rotate(
    agent: &Agent,
    request: Request<pb::RotateCaRequest>,
) -> Result<Response<pb::RotateCaResponse>, Status> {
    let by = caller_name(&request);
    let renew_after_ms = match request
        .get_ref()
        .renew_after
        .as_ref()
        .map(times::duration_ms)
    {
        None => 0,
        Some(Ok(ms)) if ms <= RENEW_AFTER_MAX.as_millis() as u64 => ms,
        Some(Ok(_)) => {
            return Err(Status::invalid_argument(format!(
                "renew_after is longer than {} days",
                RENEW_AFTER_MAX.as_secs() / 86_400
            )))
        }
        Some(Err(e)) => return Err(Status::invalid_argument(format!("renew_after {e}"))),
    };
    let Some(info) = agent.cluster_info() else {
        return Err(Status::failed_precondition(
            "this agent is in no cluster yet: init or join first",
        ));
    };
    let dir = TlsDir(agent.config().tls_dir.clone());
    if !dir.has_ca_key() {
        return Err(Status::failed_precondition(format!(
            "node {} holds no CA key and cannot rotate the CA; call an agent that does \
             (given the CA key with `clusterctl pki issue-node --issuer`)",
            agent.node_id()
        )));
    }
    if let Some(s) = agent.read_sm(|d| d.state.ca.clone()) {
        if s.in_transition() {
            return Err(Status::failed_precondition(
                ca::CaError::InTransition {
                    since_unix_ms: s.rotated_at_unix_ms,
                }
                .to_string(),
            ));
        }
    }
    let bundle = agent.credentials().ca_pem.clone();
    let name = info.cluster_name.clone();
    let d = dir.clone();
    let (old, new) = tokio::task::spawn_blocking(move || {
        let key = pki::read_pem_file(&d.ca_key())?;
        let old = pki::Ca::load(&bundle, &key)?;
        let new = pki::Ca::create(&name)?;
        pki::write_file(&d.pending_ca_key(&new.fingerprint()), &new.key_pem(), true)?;
        Ok::<_, pki::PkiError>((old, new))
    })
    .await
    .map_err(|e| Status::internal(format!("making the new CA: {e}")))?
    .map_err(|e| match e {
        pki::PkiError::NoMatchingCaCertificate => Status::failed_precondition(format!(
            "node {}'s ca.key is not the key of a CA the cluster trusts (an old CA's key?): \
             rotate through a node holding the current CA key",
            agent.node_id()
        )),
        e => Status::internal(format!("making the new CA: {}", crate::error_chain(&e))),
    })?;
    let now = now_unix_ms();
    let cmd = CaCommand::Rotate {
        new: CaCert {
            pem: new.cert_pem().to_owned(),
            fingerprint: new.fingerprint(),
        },
        old: CaCert {
            pem: old.cert_pem().to_owned(),
            fingerprint: old.fingerprint(),
        },
        renew_from_unix_ms: now + renew_after_ms,
        at_unix_ms: now,
        by: by.chars().take(ca::CA_BY_LEN_MAX).collect(),
    };
    if let Err(e) = commit(agent, cmd).await {
        let _ = std::fs::remove_file(dir.pending_ca_key(&new.fingerprint()));
        return Err(e);
    }
    tracing::warn!(new = ca::short(&new.fingerprint()), old = ca::short(&old.fingerprint()), %by, "cluster CA rotated");
    Ok(Response::new(pb::RotateCaResponse {
        ca: Some(ca_info(agent)),
    }))
}

/// `FinishCaRotation` (admins only).
pub async fn finish(
    agent: &Agent,
    request: Request<pb::FinishCaRotationRequest>,
) -> Result<Response<pb::FinishCaRotationResponse>, Status> {
    let by = caller_name(&request);
    commit(
        agent,
        CaCommand::Finish {
            at_unix_ms: now_unix_ms(),
            by: by.chars().take(ca::CA_BY_LEN_MAX).collect(),
        },
    )
    .await?;
    tracing::warn!(%by, "CA rotation finished");
    Ok(Response::new(pb::FinishCaRotationResponse {
        ca: Some(ca_info(agent)),
    }))
}

/// `GetCa`.
pub async fn get(
    agent: &Agent,
    request: Request<pb::GetCaRequest>,
) -> Result<Response<pb::GetCaResponse>, Status> {
    crate::api::read::consistent(agent, &request).await?;
    Ok(Response::new(pb::GetCaResponse {
        ca: Some(ca_info(agent)),
    }))
}
