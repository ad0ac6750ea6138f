//! `clusterctl cluster ca rotate | finish | show`: the cluster CA's rotation (see the
//! agent's `api::ca` for the protocol).

use std::path::PathBuf;
use std::time::Duration;

use clap::Subcommand;
use cluster_proto::management as pb;
use cluster_proto::times;
use serde::Serialize;

use crate::client::{connect, status_error, CtlError};
use crate::output::{json, table};
use crate::{Cli, Format};

#[derive(Debug, Subcommand)]
pub enum CaCmd {
    /// Make a new cluster CA (admin; on an agent holding the CA key). Every plane trusts
    /// the old and the new CA until `ca finish`; members renew their node certificates
    /// from the new one. Put the new trust bundle in every client's CA file (`ca show
    /// --pem`) before the members renew, or give them time with --renew-after.
    Rotate {
        /// Members renew from the new CA only after this long (e.g. 10m; a bare number
        /// is seconds; default: at once).
        #[arg(long, value_parser = crate::duration::bare_s)]
        renew_after: Option<Duration>,
        /// Write the new trust bundle (old and new CA) to FILE (a client's CA file).
        #[arg(long, value_name = "FILE")]
        bundle_out: Option<PathBuf>,
    },
    /// Stop trusting the old CA (admin): its certificates (users') are refused from now
    /// on. Refused while a member still presents a node certificate of the old CA.
    Finish {
        /// Write the trust bundle left (the new CA) to FILE.
        #[arg(long, value_name = "FILE")]
        bundle_out: Option<PathBuf>,
    },
    /// The CA state: issuing CA, the old one during a rotation, each node's CA.
    Show {
        /// Print only the trust bundle (PEM): `clusterctl cluster ca show --pem > ca.pem`.
        #[arg(long)]
        pem: bool,
        /// Write the trust bundle to FILE.
        #[arg(long, value_name = "FILE")]
        bundle_out: Option<PathBuf>,
    },
}

#[derive(Serialize)]
struct NodeCa {
    node_id: u64,
    name: String,
    ca: String,
}

#[derive(Serialize)]
struct CaView {
    current_fingerprint: String,
    current_expires_at: Option<String>,
    previous_fingerprint: Option<String>,
    rotated_at: Option<String>,
    rotated_by: Option<String>,
    renew_from: Option<String>,
    nodes: Vec<NodeCa>,
    bundle_pem: String,
}

fn which(fp: &str, ca: &pb::CaInfo) -> String {
    if fp.is_empty() {
        "not reported".into()
    } else if fp == ca.current_fingerprint {
        "current".into()
    } else if fp == ca.previous_fingerprint {
        "OLD (not renewed yet)".into()
    } else {
        format!("unknown CA {}", short(fp))
    }
}

fn short(fp: &str) -> &str {
    &fp[..fp.len().min(16)]
}

fn utc(t: Option<&cluster_proto::prost_types::Timestamp>) -> Option<String> {
    t.map(|t| cluster_proto::pki::utc(times::unix_ms(Some(t))))
}

/// The CA state as a table (or JSON).
pub fn render(fmt: Format, ca: &pb::CaInfo) -> Result<String, CtlError> {
    let v = CaView {
        current_fingerprint: ca.current_fingerprint.clone(),
        current_expires_at: ca.current_expires_at.as_ref().map(times::rfc3339),
        previous_fingerprint: (!ca.previous_fingerprint.is_empty())
            .then(|| ca.previous_fingerprint.clone()),
        rotated_at: ca.rotated_at.as_ref().map(times::rfc3339),
        rotated_by: (!ca.rotated_by.is_empty()).then(|| ca.rotated_by.clone()),
        renew_from: ca.renew_from.as_ref().map(times::rfc3339),
        nodes: ca
            .nodes
            .iter()
            .map(|n| NodeCa {
                node_id: n.node_id,
                name: n.name.clone(),
                ca: n.ca_fingerprint.clone(),
            })
            .collect(),
        bundle_pem: ca.bundle_pem.clone(),
    };
    if fmt == Format::Json {
        return json(&v);
    }
    let mut rows = vec![
        vec![
            "issuing CA".into(),
            format!(
                "{} (SHA-256; expires {})",
                ca.current_fingerprint,
                utc(ca.current_expires_at.as_ref()).unwrap_or_else(|| "-".into())
            ),
        ],
        vec![
            "old CA".into(),
            if ca.previous_fingerprint.is_empty() {
                "- (no rotation in progress)".into()
            } else {
                format!(
                    "{} (still trusted until `clusterctl cluster ca finish`)",
                    ca.previous_fingerprint
                )
            },
        ],
    ];
    if let Some(at) = utc(ca.rotated_at.as_ref()) {
        rows.push(vec!["rotated".into(), format!("{at} by {}", ca.rotated_by)]);
    }
    if !ca.previous_fingerprint.is_empty() {
        if let Some(at) = utc(ca.renew_from.as_ref()) {
            rows.push(vec!["members renew from".into(), at]);
        }
    }
    for n in &ca.nodes {
        rows.push(vec![
            format!("node {} ({})", n.node_id, n.name),
            which(&n.ca_fingerprint, ca),
        ]);
    }
    Ok(table(&["FIELD", "VALUE"], &rows))
}

fn write_bundle(path: &Option<PathBuf>, ca: &pb::CaInfo) -> Result<String, CtlError> {
    let Some(p) = path else {
        return Ok(String::new());
    };
    cluster_proto::pki::write_file(p, &ca.bundle_pem, false).map_err(|e| {
        CtlError::Local(format!(
            "cannot write the trust bundle to {}: {e}",
            p.display()
        ))
    })?;
    Ok(format!("trust bundle written to {}\n", p.display()))
}

/// `clusterctl cluster ca ...`.
pub async fn run(cli: &Cli, cmd: &CaCmd) -> Result<String, CtlError> {
    let (ep, timeout) = (cli.endpoint.as_str(), cli.timeout());
    let mut c = connect(ep, timeout).await?;
    let fail = |s| status_error(ep, timeout, s);
    match cmd {
        CaCmd::Rotate {
            renew_after,
            bundle_out,
        } => {
            let r = c
                .rotate_ca(pb::RotateCaRequest {
                    renew_after: renew_after.map(crate::duration::pb),
                })
                .await
                .map_err(fail)?
                .into_inner();
            let ca = r.ca.unwrap_or_default();
            let note = write_bundle(bundle_out, &ca)?;
            if cli.output == Format::Json {
                return render(cli.output, &ca);
            }
            Ok(format!(
                "{}{note}The new CA {} issues certificates now; the old one {} stays trusted.\n\
                 Next: put the trust bundle in every client's CA file (`clusterctl cluster ca \
                 show --pem > FILE`), give users new certificates (`clusterctl user create`), \
                 wait until `clusterctl cluster ca show` lists every node as current, then \
                 `clusterctl cluster ca finish`.\n",
                render(cli.output, &ca)?,
                short(&ca.current_fingerprint),
                short(&ca.previous_fingerprint),
            ))
        }
        CaCmd::Finish { bundle_out } => {
            let r = c
                .finish_ca_rotation(pb::FinishCaRotationRequest {})
                .await
                .map_err(fail)?
                .into_inner();
            let ca = r.ca.unwrap_or_default();
            let note = write_bundle(bundle_out, &ca)?;
            Ok(format!("{}{note}", render(cli.output, &ca)?))
        }
        CaCmd::Show { pem, bundle_out } => {
            let r = c
                .get_ca(pb::GetCaRequest {})
                .await
                .map_err(fail)?
                .into_inner();
            let ca = r.ca.unwrap_or_default();
            let note = write_bundle(bundle_out, &ca)?;
            if *pem {
                return Ok(ca.bundle_pem);
            }
            Ok(format!("{}{note}", render(cli.output, &ca)?))
        }
    }
}
