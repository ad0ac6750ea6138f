//! Nodes named on the command line by id (`2`) or by name (`n2`): a name is looked up
//! in the node list; an unknown or ambiguous one is refused, naming the nodes there are.

use std::str::FromStr;

use cluster_proto::management as pb;

use crate::client::{call, connect, CtlError};
use crate::Cli;

/// A node as given on the command line. All digits: an id (the agent refuses an unknown
/// one); anything else: a node name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeArg {
    Id(u64),
    Name(String),
}

impl FromStr for NodeArg {
    type Err = String;

    fn from_str(s: &str) -> Result<NodeArg, String> {
        let s = s.trim();
        if s.is_empty() {
            return Err("a node is its id (e.g. 2) or its name (e.g. node-2), not empty".into());
        }
        if s.bytes().all(|b| b.is_ascii_digit()) {
            return s
                .parse()
                .map(NodeArg::Id)
                .map_err(|e| format!("node id {s}: {e}"));
        }
        Ok(NodeArg::Name(s.to_owned()))
    }
}

impl std::fmt::Display for NodeArg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NodeArg::Id(n) => write!(f, "{n}"),
            NodeArg::Name(s) => f.write_str(s),
        }
    }
}

/// The id of `node`: itself, or the one node of the cluster's list with that name.
pub async fn node_id(cli: &Cli, node: &NodeArg) -> Result<u64, CtlError> {
    let name = match node {
        NodeArg::Id(n) => return Ok(*n),
        NodeArg::Name(s) => s,
    };
    let (ep, timeout) = (cli.endpoint.as_str(), cli.timeout());
    let c = connect(ep, timeout).await?;
    let nodes = crate::client::all_pages(|page_token| {
        let mut c = c.clone();
        async move {
            let req = pb::ListNodesRequest {
                page_size: crate::client::PAGE_SIZE,
                page_token,
            };
            let r = call(ep, timeout, c.list_nodes(req)).await?;
            Ok((r.nodes, r.next_page_token))
        }
    })
    .await?;
    pick(name, &nodes)
}

/// The id of the one node in `nodes` called `name`.
fn pick(name: &str, nodes: &[pb::NodeInfo]) -> Result<u64, CtlError> {
    let ids: Vec<u64> = nodes
        .iter()
        .filter(|n| n.name == name)
        .map(|n| n.node_id)
        .collect();
    match ids.as_slice() {
        [id] => Ok(*id),
        [] => {
            let known: Vec<String> = nodes
                .iter()
                .map(|n| format!("{} ({})", n.name, n.node_id))
                .collect();
            Err(CtlError::Refused {
                code: tonic::Code::NotFound,
                message: format!(
                    "no node is named {name:?}; the nodes are: {}",
                    if known.is_empty() {
                        "none".to_string()
                    } else {
                        known.join(", ")
                    }
                ),
            })
        }
        many => Err(CtlError::Refused {
            code: tonic::Code::InvalidArgument,
            message: format!(
                "the node name {name:?} is ambiguous: nodes {} are all called so; give the id",
                many.iter()
                    .map(u64::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: u64, name: &str) -> pb::NodeInfo {
        pb::NodeInfo {
            node_id: id,
            name: name.into(),
            ..Default::default()
        }
    }

    #[test]
    fn ids_names_unknown_and_ambiguous() {
        assert_eq!("2".parse(), Ok(NodeArg::Id(2)));
        assert_eq!("n2".parse(), Ok(NodeArg::Name("n2".into())));
        assert!(" ".parse::<NodeArg>().unwrap_err().contains("not empty"));
        assert!("99999999999999999999999".parse::<NodeArg>().is_err());
        let nodes = [node(1, "alpha"), node(2, "beta"), node(3, "beta")];
        assert_eq!(pick("alpha", &nodes).ok(), Some(1));
        let e = pick("gamma", &nodes).unwrap_err();
        assert_eq!(
            e.to_string(),
            "no node is named \"gamma\"; the nodes are: alpha (1), beta (2), beta (3)"
        );
        assert_eq!(e.exit_code(), crate::client::exit::REFUSED);
        let e = pick("beta", &nodes).unwrap_err();
        assert!(e.to_string().contains("ambiguous: nodes 2, 3"), "{e}");
    }
}
