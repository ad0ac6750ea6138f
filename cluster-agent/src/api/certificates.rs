//! Certificates issued online: join tokens (created by an admin, consumed through Raft so
//! each is good once, cluster-wide) and the signing of certificate requests by an agent
//! that holds the CA key (`ca.key` in its `tls_dir`): a node certificate for a join
//! token, a user certificate for an admin.

use std::net::IpAddr;
use std::time::Duration;

use cluster_proto::management as pb;
use cluster_proto::pki::{self, Identity, Role, TlsDir};
use cluster_proto::times;
use tonic::{Request, Response, Status};

use crate::api::auth::{Caller, CallerCertificate};
use crate::node::{now_unix_ms, Agent, ForwardReply, ForwardRequest, WriteError};
use crate::state::join_tokens::{self, TokenCommand, JOIN_TOKEN_TTL_MAX_MS};
use crate::state::revocations;
use crate::state::{Command, CommandResult};

/// Lifetime of a join token when none is asked for.
pub const JOIN_TOKEN_TTL_DEFAULT: Duration = Duration::from_secs(3_600);
/// Largest certificate signing request accepted.
pub const CSR_LEN_MAX: usize = 16 * 1024;
/// Longest join token accepted (ours are 45 characters).
pub const JOIN_TOKEN_LEN_MAX: usize = 128;
/// How long a request waits for a token this replica does not know yet.
pub const TOKEN_ARRIVAL_WAIT: Duration = Duration::from_secs(2);
/// How far back a certificate's validity starts before its issue (`pki`'s slack).
const CERT_BACKDATE_MS: u64 = 60_000;
/// IP addresses a node certificate may carry at most.
pub const NODE_IPS_MAX: usize = 8;

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A new token: "<id>.<secret>" (id 6 bytes, secret 16 bytes, hex).
fn new_token() -> (String, String) {
    let id: [u8; 6] = rand::random();
    let secret: [u8; 16] = rand::random();
    (hex(&id), hex(&secret))
}

async fn commit(agent: &Agent, cmd: TokenCommand) -> Result<(), Status> {
    // A refused token (unknown, wrong secret, used, expired) is a permission matter.
    match agent
        .write(ForwardRequest::Command(Command::Token(cmd)))
        .await
    {
        Ok(ForwardReply::Command {
            result: CommandResult::Ok,
            ..
        }) => Ok(()),
        Ok(ForwardReply::Command {
            result: CommandResult::Rejected { reason },
            ..
        })
        | Err(WriteError::Rejected { reason }) => Err(Status::permission_denied(reason)),
        Ok(other) => Err(crate::api::status::unexpected_reply(&other)),
        Err(e) => Err(e.into()),
    }
}

pub async fn create_join_token(
    agent: &Agent,
    request: Request<pb::CreateJoinTokenRequest>,
) -> Result<Response<pb::CreateJoinTokenResponse>, Status> {
    let ttl = request.get_ref().ttl.as_ref();
    let ttl_ms = match ttl.map(times::duration_ms).transpose() {
        Err(e) => return Err(Status::invalid_argument(format!("ttl {e}"))),
        Ok(None | Some(0)) => JOIN_TOKEN_TTL_DEFAULT.as_millis() as u64,
        Ok(Some(ms)) => ms,
    };
    if ttl_ms > JOIN_TOKEN_TTL_MAX_MS {
        return Err(Status::invalid_argument(format!(
            "ttl {} is longer than the longest token lifetime, {} s (7 days)",
            ttl.map(times::duration_string).unwrap_or_default(),
            JOIN_TOKEN_TTL_MAX_MS / 1_000
        )));
    }
    let (id, secret) = new_token();
    let now = now_unix_ms();
    let expires_unix_ms = now + ttl_ms;
    commit(
        agent,
        TokenCommand::Create {
            id: id.clone(),
            secret_sha256: pki::sha256_hex(secret.as_bytes()),
            expires_unix_ms,
            at_unix_ms: now,
        },
    )
    .await?;
    tracing::info!(token_id = %id, expires_unix_ms, "join token created");
    Ok(Response::new(pb::CreateJoinTokenResponse {
        token: format!("{id}.{secret}"),
        expires_at: times::timestamp_from_unix_ms(expires_unix_ms),
    }))
}

fn parse_ips(ips: &[String]) -> Result<Vec<IpAddr>, Status> {
    if ips.is_empty() || ips.len() > NODE_IPS_MAX {
        return Err(Status::invalid_argument(format!(
            "a node certificate needs 1 to {NODE_IPS_MAX} IP addresses (management, Raft, migration)"
        )));
    }
    ips.iter()
        .map(|ip| {
            ip.parse()
                .map_err(|_| Status::invalid_argument(format!("{ip:?} is not an IP address")))
        })
        .collect()
}

/// The CA, on an agent that holds its key.
async fn load_ca(agent: &Agent) -> Result<pki::Ca, Status> {
    let dir = TlsDir(agent.config().tls_dir.clone());
    let bundle = agent.credentials().ca_pem.clone();
    if !dir.has_ca_key() {
        return Err(Status::failed_precondition(format!(
            "node {} holds no CA key and cannot issue certificates; ask a node that does \
             (given the CA key with `clusterctl pki issue-node --issuer`)",
            agent.node_id()
        )));
    }
    // The key's certificate in the trust bundle: the issuing CA.
    tokio::task::spawn_blocking(move || {
        pki::read_pem_file(&dir.ca_key()).and_then(|key| pki::Ca::load(&bundle, &key))
    })
    .await
    .map_err(|e| Status::internal(format!("loading the CA: {e}")))?
    .map_err(|e| {
        Status::internal(format!(
            "the CA key is unusable: {}",
            crate::error_chain(&e)
        ))
    })
}

/// Sign a renewal of the certificate `current_der` held by member node `node_id`: the
/// same identity and IP addresses, the issuer's configured lifetime.
pub fn sign_renewal(
    agent: &Agent,
    ca: &pki::Ca,
    node_id: u64,
    current_der: &[u8],
    csr_pem: &str,
) -> Result<String, Status> {
    if csr_pem.is_empty() || csr_pem.len() > CSR_LEN_MAX {
        return Err(Status::invalid_argument(format!(
            "csr_pem must be a PEM certificate signing request of at most {CSR_LEN_MAX} bytes"
        )));
    }
    if !agent.read_sm(|d| d.state.nodes.contains_key(&node_id)) {
        return Err(Status::permission_denied(format!(
            "node {node_id} is not a member of this cluster; only members renew their certificates"
        )));
    }
    let ips = pki::ips_of(current_der)
        .map_err(|e| Status::invalid_argument(format!("the calling certificate: {e}")))?;
    if ips.len() > NODE_IPS_MAX {
        return Err(Status::invalid_argument(format!(
            "the calling certificate names more than {NODE_IPS_MAX} IP addresses"
        )));
    }
    ca.sign_request(
        csr_pem,
        &Identity::Node(node_id),
        &ips,
        agent.config().node_cert_validity,
    )
    .map_err(|e| Status::invalid_argument(crate::error_chain(&e)))
}

/// `RenewNodeCertificate`: a member node's new certificate (see the proto).
pub async fn renew_node_certificate(
    agent: &Agent,
    request: Request<pb::RenewNodeCertificateRequest>,
) -> Result<Response<pb::RenewNodeCertificateResponse>, Status> {
    let caller = request.extensions().get::<Caller>().map(|c| c.0.clone());
    let der = request
        .extensions()
        .get::<CallerCertificate>()
        .map(|c| c.0.clone());
    let (node_id, der) = match (caller, der) {
        (Some(Identity::Node(id)), Some(der)) => (id, der),
        (Some(other), _) => {
            return Err(Status::permission_denied(format!(
                "{other} cannot renew a node certificate; a node renews its own with its \
                 current node certificate"
            )))
        }
        _ => {
            return Err(Status::unauthenticated(
                "renewing a node certificate needs the node's current certificate",
            ))
        }
    };
    let ca = load_ca(agent).await?;
    let cert_pem = sign_renewal(agent, &ca, node_id, &der, &request.get_ref().csr_pem)?;
    tracing::info!(node_id, "node certificate renewed");
    Ok(Response::new(pb::RenewNodeCertificateResponse {
        cert_pem,
        ca_pem: agent.credentials().ca_pem.clone(),
    }))
}

pub async fn issue_certificate(
    agent: &Agent,
    request: Request<pb::IssueCertificateRequest>,
) -> Result<Response<pb::IssueCertificateResponse>, Status> {
    let caller = request.extensions().get::<Caller>().map(|c| c.0.clone());
    let r = request.into_inner();
    if r.csr_pem.is_empty() || r.csr_pem.len() > CSR_LEN_MAX {
        return Err(Status::invalid_argument(format!(
            "csr_pem must be a PEM certificate signing request of at most {CSR_LEN_MAX} bytes"
        )));
    }
    if r.join_token.len() > JOIN_TOKEN_LEN_MAX {
        return Err(Status::invalid_argument(format!(
            "join_token is {} bytes; a join token is at most {JOIN_TOKEN_LEN_MAX}",
            r.join_token.len()
        )));
    }
    let node = !r.join_token.is_empty();
    let user = !r.user_name.is_empty();
    if node == user {
        return Err(Status::invalid_argument(
            "give either a join token (a node certificate) or a user name (a user certificate)",
        ));
    }
    // A node's request: the token must be good on this replica before anything costly
    // (loading the CA, signing, a Raft write) happens; a token created a moment ago on
    // another node may still be on its way here.
    let token = if node {
        let (token_id, secret) = r
            .join_token
            .split_once('.')
            .ok_or_else(|| Status::invalid_argument("a join token looks like <id>.<secret>"))?;
        let hash = pki::sha256_hex(secret.as_bytes());
        let deadline = tokio::time::Instant::now() + TOKEN_ARRIVAL_WAIT;
        loop {
            let verdict = agent.read_sm(|d| {
                join_tokens::check(&d.state.join_tokens, token_id, &hash, now_unix_ms())
            });
            match verdict {
                Ok(()) => break,
                Err(join_tokens::TokenError::Unknown(_))
                    if tokio::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(50)).await
                }
                Err(e) => return Err(Status::permission_denied(e.to_string())),
            }
        }
        Some((token_id.to_owned(), hash))
    } else {
        None
    };
    // Everything else that can be checked without spending the token, first.
    let ca = load_ca(agent).await?;
    let (id, ips) = if node {
        if r.node_id == 0 {
            return Err(Status::invalid_argument(
                "node_id 0 is reserved; use 1 or higher",
            ));
        }
        let ips = parse_ips(&r.ips)?;
        if agent.read_sm(|d| d.state.nodes.contains_key(&r.node_id)) {
            return Err(Status::already_exists(format!(
                "node {} is a member already; a join token is for a new node id",
                r.node_id
            )));
        }
        (Identity::Node(r.node_id), ips)
    } else {
        match &caller {
            Some(Identity::User {
                role: Role::Admin, ..
            }) => {}
            Some(other) => {
                return Err(Status::permission_denied(format!(
                    "{other} cannot issue user certificates; that needs role admin"
                )))
            }
            None => {
                return Err(Status::unauthenticated(
                    "issuing a user certificate needs an admin's client certificate",
                ))
            }
        }
        pki::check_user_name(&r.user_name).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let role = match pb::UserRole::try_from(r.role) {
            Ok(pb::UserRole::Admin) => Role::Admin,
            Ok(pb::UserRole::Viewer) => Role::Viewer,
            Ok(pb::UserRole::Unspecified) | Err(_) => {
                return Err(Status::invalid_argument(format!(
                    "role {} is not a user role; give USER_ROLE_ADMIN or USER_ROLE_VIEWER",
                    r.role
                )))
            }
        };
        (
            Identity::User {
                name: r.user_name.clone(),
                role,
            },
            Vec::new(),
        )
    };
    // Sign first (a bad request spends no token), hand the certificate out only once the
    // token is spent.
    let valid_for = if node {
        agent.config().node_cert_validity
    } else {
        pki::CERT_VALIDITY
    };
    let cert_pem = ca
        .sign_request(&r.csr_pem, &id, &ips, valid_for)
        .map_err(|e| Status::invalid_argument(crate::error_chain(&e)))?;
    if let Some((token_id, secret_sha256)) = token {
        commit(
            agent,
            TokenCommand::Consume {
                id: token_id,
                secret_sha256,
                node_id: r.node_id,
                at_unix_ms: now_unix_ms(),
            },
        )
        .await?;
    }
    tracing::info!(identity = %id, by = ?caller, "certificate issued");
    // The trust bundle (one CA, or two while the CA is rotated) for the holder's ca.pem.
    Ok(Response::new(pb::IssueCertificateResponse {
        cert_pem,
        ca_pem: agent.credentials().ca_pem.clone(),
    }))
}

fn revocation_to_pb(r: &revocations::Revocation) -> pb::Revocation {
    pb::Revocation {
        user_name: r.user.clone(),
        // The stored role is text ("" for a name revocation); an unknown word is unspecified.
        role: match r.role.parse::<Role>() {
            Ok(Role::Admin) => pb::UserRole::Admin as i32,
            Ok(Role::Viewer) => pb::UserRole::Viewer as i32,
            Err(_) => pb::UserRole::Unspecified as i32,
        },
        cert_sha256: r.cert_sha256.clone().unwrap_or_default(),
        revoked_at: times::timestamp_from_unix_ms(r.at_unix_ms),
        by: r.by.clone(),
        expires_at: times::timestamp_from_unix_ms(r.expires_unix_ms),
    }
}

/// Revoke one user certificate (`cert_pem`) or every certificate of a user name
/// (`user_name`) — see `crate::state::revocations`. Admins only (the auth layer).
pub async fn revoke_certificate(
    agent: &Agent,
    request: Request<pb::RevokeCertificateRequest>,
) -> Result<Response<pb::RevokeCertificateResponse>, Status> {
    let by = request
        .extensions()
        .get::<Caller>()
        .map(|c| c.0.to_string())
        .unwrap_or_else(|| "an unknown caller".into());
    let r = request.into_inner();
    let now = now_unix_ms();
    let rev = match (r.user_name.is_empty(), r.cert_pem.is_empty()) {
        (false, true) => {
            pki::check_user_name(&r.user_name)
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
            revocations::Revocation {
                user: r.user_name,
                role: String::new(),
                cert_sha256: None,
                // Every certificate of the name issued before now has expired by then.
                expires_unix_ms: now
                    .saturating_add(pki::CERT_VALIDITY.as_millis() as u64)
                    .saturating_add(CERT_BACKDATE_MS),
                at_unix_ms: now,
                by,
            }
        }
        (true, false) => {
            if r.cert_pem.len() as u64 > pki::PEM_FILE_LEN_MAX {
                return Err(Status::invalid_argument(format!(
                    "cert_pem is {} bytes; a certificate is at most {}",
                    r.cert_pem.len(),
                    pki::PEM_FILE_LEN_MAX
                )));
            }
            let der = pki::certificates_der(&r.cert_pem)
                .into_iter()
                .next()
                .ok_or_else(|| {
                    Status::invalid_argument("cert_pem holds no PEM CERTIFICATE block")
                })?;
            let id = pki::identity_of(&der).map_err(|e| {
                Status::invalid_argument(format!("not a certificate of this cluster: {e}"))
            })?;
            let (user, role) = match id {
                Identity::User { name, role } => (name, role),
                Identity::Node(n) => {
                    return Err(Status::invalid_argument(format!(
                        "this is node {n}'s certificate: node certificates are not revoked; \
                         remove the node (`clusterctl cluster leave {n}`) and its certificate \
                         is refused once the removal commits"
                    )))
                }
            };
            let expires = pki::not_after(&der)
                .map(pki::unix_ms)
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
            revocations::Revocation {
                user,
                role: role.to_string(),
                cert_sha256: Some(pki::sha256_hex(&der)),
                expires_unix_ms: expires,
                at_unix_ms: now,
                by,
            }
        }
        _ => {
            return Err(Status::invalid_argument(
                "give either a user name (every certificate of that user) or one certificate \
                 (cert_pem), not both",
            ))
        }
    };
    // Twice is answered from this replica first, with its own code.
    if let Some(old) = agent.read_sm(|d| d.state.revocations.get(&rev.key()).cloned()) {
        return Err(Status::already_exists(format!(
            "{} is already revoked (at {}, by {})",
            old.what(),
            pki::utc(old.at_unix_ms),
            old.by
        )));
    }
    let cmd = Command::Revocation(revocations::RevocationCommand::Revoke(rev.clone()));
    match agent.write(ForwardRequest::Command(cmd)).await {
        Ok(ForwardReply::Command {
            result: CommandResult::Ok,
            ..
        }) => {}
        Ok(ForwardReply::Command {
            result: CommandResult::Rejected { reason },
            ..
        })
        | Err(WriteError::Rejected { reason }) => {
            return Err(if reason.contains("already revoked") {
                Status::already_exists(reason)
            } else if reason.contains("list is full") {
                Status::resource_exhausted(reason)
            } else {
                Status::invalid_argument(reason)
            })
        }
        Ok(other) => return Err(crate::api::status::unexpected_reply(&other)),
        Err(e) => return Err(e.into()),
    }
    tracing::warn!(what = %rev.what(), by = %rev.by, "certificate revoked");
    Ok(Response::new(pb::RevokeCertificateResponse {
        revocation: Some(revocation_to_pb(&rev)),
    }))
}

/// The revocation list (admins only: the auth layer), oldest first, in pages keyed by
/// the revocation time and the table key (unique).
pub async fn list_revocations(
    agent: &Agent,
    request: Request<pb::ListRevocationsRequest>,
) -> Result<Response<pb::ListRevocationsResponse>, Status> {
    crate::api::read::consistent(agent, &request).await?;
    let req = request.into_inner();
    let all: Vec<_> = agent.read_sm(|d| d.state.revocations.values().cloned().collect());
    let (page, next_page_token) =
        crate::api::paging::page(all, revocation_page_key, req.page_size, &req.page_token)?;
    Ok(Response::new(pb::ListRevocationsResponse {
        revocations: page.iter().map(revocation_to_pb).collect(),
        next_page_token,
    }))
}

/// A revocation's place in the list: its time (zero-padded, so text order is time
/// order), then its table key.
fn revocation_page_key(r: &revocations::Revocation) -> String {
    format!("{:020}:{}", r.at_unix_ms, r.key())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn revoked(user: &str, at_unix_ms: u64) -> revocations::Revocation {
        revocations::Revocation {
            user: user.into(),
            role: String::new(),
            cert_sha256: None,
            expires_unix_ms: at_unix_ms + 1,
            at_unix_ms,
            by: "root".into(),
        }
    }

    /// Revocations page oldest first; two at the same millisecond both appear once.
    #[test]
    fn revocations_page_by_time_then_key() {
        let all = vec![
            revoked("carol", 300),
            revoked("bob", 200),
            revoked("alice", 200),
            revoked("dave", 100),
        ];
        let mut seen = Vec::new();
        let mut token = String::new();
        loop {
            let (page, next) =
                crate::api::paging::page(all.clone(), revocation_page_key, 1, &token)
                    .unwrap_or_default();
            seen.extend(page.iter().map(|r| r.user.clone()));
            if next.is_empty() {
                break;
            }
            token = next;
        }
        assert_eq!(seen, ["dave", "alice", "bob", "carol"]);
        let pb = revocation_to_pb(&revoked("erin", 5_000));
        assert_eq!(pb.role(), pb::UserRole::Unspecified);
        assert_eq!(times::unix_ms(pb.revoked_at.as_ref()), 5_000);
    }
}
