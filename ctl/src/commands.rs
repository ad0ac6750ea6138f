//! The commands: each sends one request and returns the rendered answer.

use std::time::Duration;

use cluster_proto::management as pb;

use crate::client::{connect, status_error, CtlError};
use crate::output;
use crate::{Cli, ClusterCmd, Cmd, ConsoleCmd, KvCmd, NodeCmd};

/// Joins wait for the new node to catch up; give them at least this long.
const JOIN_TIMEOUT_MIN: Duration = Duration::from_secs(60);

pub async fn run(cli: &Cli) -> Result<String, CtlError> {
    let mut timeout = cli.timeout();
    if matches!(cli.command, Cmd::Cluster(ClusterCmd::Join { .. })) {
        timeout = timeout.max(JOIN_TIMEOUT_MIN);
    }
    let ep = cli.endpoint.as_str();
    let mut c = connect(ep, timeout).await?;
    let fail = |s| status_error(ep, timeout, s);
    let fmt = cli.output;
    match &cli.command {
        Cmd::Cluster(ClusterCmd::Init { name }) => {
            let r = c
                .init_cluster(pb::InitClusterRequest {
                    cluster_name: name.clone(),
                })
                .await
                .map_err(fail)?
                .into_inner();
            output::init(fmt, &r)
        }
        Cmd::Cluster(ClusterCmd::Join { via }) => {
            let r = c
                .join_cluster(pb::JoinClusterRequest { via: via.clone() })
                .await
                .map_err(fail)?
                .into_inner();
            output::join(fmt, &r)
        }
        Cmd::Cluster(ClusterCmd::Leave { node_id }) => {
            let r = c
                .leave_cluster(pb::LeaveClusterRequest { node_id: *node_id })
                .await
                .map_err(fail)?
                .into_inner();
            output::leave(fmt, *node_id, &r)
        }
        Cmd::Cluster(ClusterCmd::Status) => {
            let r = c
                .cluster_status(pb::ClusterStatusRequest {})
                .await
                .map_err(fail)?
                .into_inner();
            output::status(fmt, &r)
        }
        Cmd::Node(NodeCmd::List) => {
            let r = c
                .list_nodes(pb::ListNodesRequest {})
                .await
                .map_err(fail)?
                .into_inner();
            output::nodes(fmt, &r.nodes)
        }
        Cmd::Node(NodeCmd::Show { node_id }) => {
            let r = c
                .get_node(pb::GetNodeRequest { node_id: *node_id })
                .await
                .map_err(fail)?
                .into_inner();
            output::node(fmt, &r)
        }
        Cmd::Node(NodeCmd::Resume {
            node_id,
            failback: true,
            ..
        }) => crate::drain::resume(cli, *node_id, true).await,
        Cmd::Node(NodeCmd::Drain {
            node_id,
            dry_run,
            watch,
        }) => crate::drain::drain(cli, *node_id, *dry_run, *watch).await,
        Cmd::Drain(d) => crate::drain::run(cli, d).await,
        Cmd::Policy(p) => crate::drain::policy(cli, p).await,
        Cmd::Node(NodeCmd::Pause { node_id, reason })
        | Cmd::Node(NodeCmd::Resume {
            node_id, reason, ..
        }) => {
            let state = if matches!(cli.command, Cmd::Node(NodeCmd::Pause { .. })) {
                "paused"
            } else {
                "up"
            };
            let r = c
                .set_node_state(pb::SetNodeStateRequest {
                    node_id: *node_id,
                    state: state.into(),
                    reason: reason.clone(),
                })
                .await
                .map_err(fail)?
                .into_inner();
            output::node(fmt, &r)
        }
        Cmd::Node(NodeCmd::Standby { node_id, reason }) => {
            let r = c
                .standby_node(pb::StandbyNodeRequest {
                    node_id: *node_id,
                    reason: reason.clone(),
                })
                .await
                .map_err(fail)?
                .into_inner();
            output::node(fmt, &r)
        }
        Cmd::Node(NodeCmd::Wake { node_id, reason }) => {
            let r = c
                .wake_node(pb::WakeNodeRequest {
                    node_id: *node_id,
                    reason: reason.clone(),
                })
                .await
                .map_err(fail)?
                .into_inner();
            output::node(fmt, &r)
        }
        Cmd::Events { after, limit } => {
            let r = c
                .list_events(pb::ListEventsRequest {
                    after_seq: *after,
                    limit: *limit,
                })
                .await
                .map_err(fail)?
                .into_inner();
            output::events(fmt, &r.events)
        }
        Cmd::Console(ConsoleCmd::Url) => {
            let r = c
                .console_login(pb::ConsoleLoginRequest {})
                .await
                .map_err(fail)?
                .into_inner();
            if fmt == crate::Format::Json {
                return output::json(&r);
            }
            Ok(format!(
                "{}\n(good once, for a minute; the agent presents its node certificate, signed \
                 by the cluster CA)\n",
                r.url
            ))
        }
        Cmd::Kv(KvCmd::Put { key, value }) => {
            let r = c
                .put_kv(pb::PutKvRequest {
                    key: key.clone(),
                    value: value.clone(),
                })
                .await
                .map_err(fail)?
                .into_inner();
            output::put(fmt, &r)
        }
        Cmd::Kv(KvCmd::Get { key }) => {
            let r = c
                .get_kv(pb::GetKvRequest { key: key.clone() })
                .await
                .map_err(fail)?
                .into_inner();
            if !r.found {
                return Err(CtlError::Refused {
                    code: tonic::Code::NotFound,
                    message: format!("key {key:?} is not set"),
                });
            }
            output::get(fmt, key, &r)
        }
        Cmd::Vm(v) => crate::vm::run(cli, v).await,
        Cmd::Disk(d) => crate::disk::run(cli, d).await,
        Cmd::Migration(m) => crate::migration::run(cli, m).await,
        Cmd::Health { service } => health(cli, service).await,
        Cmd::Node(NodeCmd::WhyNot { vm, node_id }) => crate::vm::why_not(cli, vm, *node_id).await,
        Cmd::Pki(p @ crate::pki::PkiCmd::Join { .. }) => crate::pki::join(cli, p).await,
        Cmd::User(u) => crate::pki::user(cli, u).await,
        Cmd::Cluster(ClusterCmd::Token(crate::pki::TokenCmd::Create { ttl })) => {
            let r = c
                .create_join_token(pb::CreateJoinTokenRequest { ttl_s: *ttl })
                .await
                .map_err(fail)?
                .into_inner();
            Ok(format!("{}\n", r.token))
        }
        // Local commands never reach an agent (`main::run_local`).
        Cmd::Pki(_) | Cmd::Config(_) => Err(CtlError::Local(
            "this command works on local files only".into(),
        )),
    }
}

/// `clusterctl health [--service NAME]`: the standard gRPC health check of the agent.
async fn health(cli: &Cli, service: &str) -> Result<String, CtlError> {
    use tonic_health::pb::health_check_response::ServingStatus;
    let (ep, timeout) = (cli.endpoint.as_str(), cli.timeout());
    let mut h = crate::client::service(
        ep,
        timeout,
        tonic_health::pb::health_client::HealthClient::new,
    )
    .await?;
    let r = crate::client::call(
        ep,
        timeout,
        h.check(tonic_health::pb::HealthCheckRequest {
            service: service.to_owned(),
        }),
    )
    .await?;
    let shown = if service.is_empty() { "agent" } else { service };
    match ServingStatus::try_from(r.status) {
        Ok(ServingStatus::Serving) => Ok(format!("{shown} at {ep}: serving\n")),
        other => Err(CtlError::Refused {
            code: tonic::Code::FailedPrecondition,
            message: format!(
                "{shown} at {ep} is not serving ({})",
                other.map_or("unknown status", |s| s.as_str_name())
            ),
        }),
    }
}
