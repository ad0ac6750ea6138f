//! The commands: each sends one request and returns the rendered answer.

use std::time::Duration;

use cluster_proto::management as pb;

use crate::client::{connect, status_error, Conn, CtlError};
use crate::output;
use crate::{Cli, ClusterCmd, Cmd, ConsoleCmd, KvCmd, NodeCmd};
use cluster_proto::management::management_service_client::ManagementServiceClient;

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
            // Resolved once: after the leave the name is gone from the node list.
            let node_id = crate::nodes::node_id(cli, node_id).await?;
            let r = c
                .leave_cluster(pb::LeaveClusterRequest { node_id })
                .await
                .map_err(fail)?
                .into_inner();
            output::leave(fmt, node_id, &r)
        }
        Cmd::Cluster(ClusterCmd::Ca(cmd)) => crate::ca::run(cli, cmd).await,
        Cmd::Cluster(ClusterCmd::Status) => {
            let r = c
                .cluster_status(pb::ClusterStatusRequest {})
                .await
                .map_err(fail)?
                .into_inner();
            output::status(fmt, &r)
        }
        Cmd::Node(NodeCmd::List) => {
            let nodes = crate::client::all_pages(|page_token| {
                let mut c = c.clone();
                async move {
                    let r = c
                        .list_nodes(pb::ListNodesRequest {
                            page_size: crate::client::PAGE_SIZE,
                            page_token,
                        })
                        .await
                        .map_err(fail)?
                        .into_inner();
                    Ok((r.nodes, r.next_page_token))
                }
            })
            .await?;
            output::nodes(fmt, &nodes)
        }
        Cmd::Node(NodeCmd::Show { node_id }) => {
            let r = c
                .get_node(pb::GetNodeRequest {
                    node_id: crate::nodes::node_id(cli, node_id).await?,
                })
                .await
                .map_err(fail)?
                .into_inner();
            output::node(fmt, &crate::client::required(r.node, "node")?)
        }
        Cmd::Node(NodeCmd::Resume {
            node_id,
            failback: true,
            ..
        }) => crate::drain::resume(cli, crate::nodes::node_id(cli, node_id).await?, true).await,
        Cmd::Node(NodeCmd::Drain {
            node_id,
            dry_run,
            watch,
        }) => {
            crate::drain::drain(
                cli,
                crate::nodes::node_id(cli, node_id).await?,
                *dry_run,
                *watch,
            )
            .await
        }
        Cmd::Drain(d) => crate::drain::run(cli, d).await,
        Cmd::Policy(p) => crate::drain::policy(cli, p).await,
        Cmd::Node(NodeCmd::Pause { node_id, reason })
        | Cmd::Node(NodeCmd::Resume {
            node_id, reason, ..
        }) => {
            let state = if matches!(cli.command, Cmd::Node(NodeCmd::Pause { .. })) {
                pb::NodeState::Paused
            } else {
                pb::NodeState::Up
            };
            let r = c
                .set_node_state(pb::SetNodeStateRequest {
                    node_id: crate::nodes::node_id(cli, node_id).await?,
                    state: state as i32,
                    reason: reason.clone(),
                })
                .await
                .map_err(fail)?
                .into_inner();
            output::node(fmt, &crate::client::required(r.node, "node")?)
        }
        Cmd::Node(NodeCmd::Standby { node_id, reason }) => {
            let r = c
                .standby_node(pb::StandbyNodeRequest {
                    node_id: crate::nodes::node_id(cli, node_id).await?,
                    reason: reason.clone(),
                })
                .await
                .map_err(fail)?
                .into_inner();
            output::node(fmt, &crate::client::required(r.node, "node")?)
        }
        Cmd::Node(NodeCmd::Wake { node_id, reason }) => {
            let r = c
                .wake_node(pb::WakeNodeRequest {
                    node_id: crate::nodes::node_id(cli, node_id).await?,
                    reason: reason.clone(),
                })
                .await
                .map_err(fail)?
                .into_inner();
            output::node(fmt, &crate::client::required(r.node, "node")?)
        }
        Cmd::Events {
            after,
            limit,
            tail,
            follow,
        } => events(cli, &mut c, *after, *limit, *tail, *follow).await,
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
        Cmd::Node(NodeCmd::WhyNot { vm, node_id }) => {
            crate::vm::why_not(cli, vm, crate::nodes::node_id(cli, node_id).await?).await
        }
        Cmd::Pki(p @ crate::pki::PkiCmd::Join { .. }) => crate::pki::join(cli, p).await,
        Cmd::User(u) => crate::pki::user(cli, u).await,
        Cmd::Cluster(ClusterCmd::Token(crate::pki::TokenCmd::Create { ttl })) => {
            let r = c
                .create_join_token(pb::CreateJoinTokenRequest {
                    ttl: Some(crate::duration::pb(std::time::Duration::from_secs(*ttl))),
                })
                .await
                .map_err(fail)?
                .into_inner();
            Ok(format!("{}\n", r.token))
        }
        // Local commands never reach an agent (`main::run_local`).
        Cmd::Pki(_) | Cmd::Config(_) | Cmd::Completions { .. } | Cmd::Man { .. } => Err(
            CtlError::Local("this command works on local files only".into()),
        ),
    }
}

/// What `events` shows without --after/--limit/--tail: the newest this many.
const EVENTS_DEFAULT_TAIL: u32 = 1000;
/// Events asked for per `ListEvents` page (the server's largest page).
const EVENTS_PAGE_MAX: u32 = 1000;

/// `clusterctl events [--after SEQ] [--limit N] [--tail N] [-f]`.
async fn events(
    cli: &Cli,
    c: &mut ManagementServiceClient<Conn>,
    after: Option<u64>,
    limit: Option<u32>,
    tail: Option<u32>,
    follow: bool,
) -> Result<String, CtlError> {
    let (ep, timeout) = (cli.endpoint.as_str(), cli.timeout());
    let fail = |s| status_error(ep, timeout, s);
    // The events after `after_seq`, at most `limit` (0: all), page by page.
    let mut list = async |after_seq: u64, limit: u32| {
        let mut all = pb::ListEventsResponse::default();
        let mut page_token = String::new();
        loop {
            let left = if limit == 0 {
                EVENTS_PAGE_MAX
            } else {
                (limit as usize)
                    .saturating_sub(all.events.len())
                    .min(EVENTS_PAGE_MAX as usize) as u32
            };
            let page = c
                .list_events(pb::ListEventsRequest {
                    after_seq,
                    page_size: left,
                    page_token,
                })
                .await
                .map_err(fail)?
                .into_inner();
            all.last_seq = page.last_seq;
            let empty = page.events.is_empty();
            all.events.extend(page.events);
            page_token = page.next_page_token;
            if page_token.is_empty() || empty || (limit != 0 && all.events.len() >= limit as usize)
            {
                return Ok::<_, CtlError>(all);
            }
        }
    };
    let tail = match (after, limit, tail) {
        (None, None, None) => Some(EVENTS_DEFAULT_TAIL),
        _ => tail,
    };
    let (mut after, limit) = match tail {
        // Any answer carries the newest event's sequence number.
        Some(n) => (
            list(u64::MAX, 1).await?.last_seq.saturating_sub(n.into()),
            n,
        ),
        None => (after.unwrap_or(0), limit.unwrap_or(0)),
    };
    let first = if tail == Some(0) {
        Vec::new()
    } else {
        list(after, limit).await?.events
    };
    if !follow {
        return output::events(cli.output, &first, output::now_unix_ms());
    }
    // Then the agent's event stream (`WatchEvents`) from the last event shown, so none is
    // missed or shown twice; it has no deadline, unlike `c`'s calls.
    let mut stream = None;
    let mut header = true;
    let mut evs = first;
    loop {
        if let Some(last) = evs.last() {
            after = last.seq;
        }
        if header || !evs.is_empty() {
            let mut text = output::event_lines(
                cli.output,
                &evs,
                header && cli.output != crate::Format::Json,
            )?;
            if cli.yaml {
                // One YAML document per event.
                let mut docs = String::new();
                for line in text.lines() {
                    let v: serde_json::Value =
                        serde_json::from_str(line).map_err(|e| CtlError::Render(e.to_string()))?;
                    let doc =
                        serde_yaml::to_string(&v).map_err(|e| CtlError::Render(e.to_string()))?;
                    docs.push_str("---\n");
                    docs.push_str(&doc);
                }
                text = docs;
            }
            header = false;
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
                Ok(()) => {}
                // `clusterctl events -f | head`: the reader left.
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(String::new()),
                Err(e) => return Err(CtlError::Local(format!("cannot write the output: {e}"))),
            }
        }
        let events = match &mut stream {
            Some(s) => s,
            None => {
                let mut w =
                    crate::client::service(ep, timeout, ManagementServiceClient::new).await?;
                let s = w
                    .watch_events(pb::WatchEventsRequest { after_seq: after })
                    .await
                    .map_err(fail)?
                    .into_inner();
                stream.insert(s)
            }
        };
        evs = match events.message().await.map_err(fail)? {
            Some(m) => m.event.into_iter().collect(),
            None => {
                return Err(CtlError::Unreachable {
                    endpoint: ep.to_owned(),
                    cause: "the agent ended the event stream".into(),
                })
            }
        };
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
