//! The etcd baseline of `raft-bench`: three `etcd` members (Debian's `etcd-server`) on
//! loopback, each with its WAL on the same disk as the agents' data, and a gRPC client
//! of the few `etcdserverpb` calls the benchmark needs (the messages are declared here by
//! hand with their etcd field numbers: `etcdserver/etcdserverpb/rpc.proto` of etcd 3.4).

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::{Channel, Endpoint};

#[derive(Clone, PartialEq, prost::Message)]
pub struct PutRequest {
    #[prost(bytes = "vec", tag = "1")]
    pub key: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    pub value: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ResponseHeader {
    #[prost(uint64, tag = "1")]
    pub cluster_id: u64,
    #[prost(uint64, tag = "2")]
    pub member_id: u64,
    #[prost(int64, tag = "3")]
    pub revision: i64,
    #[prost(uint64, tag = "4")]
    pub raft_term: u64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct PutResponse {
    #[prost(message, optional, tag = "1")]
    pub header: Option<ResponseHeader>,
}

/// A range read of one key; `serializable` false: linearizable (etcd's read index).
#[derive(Clone, PartialEq, prost::Message)]
pub struct RangeRequest {
    #[prost(bytes = "vec", tag = "1")]
    pub key: Vec<u8>,
    #[prost(bool, tag = "7")]
    pub serializable: bool,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct RangeResponse {
    #[prost(message, optional, tag = "1")]
    pub header: Option<ResponseHeader>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct StatusRequest {}

#[derive(Clone, PartialEq, prost::Message)]
pub struct StatusResponse {
    #[prost(message, optional, tag = "1")]
    pub header: Option<ResponseHeader>,
    #[prost(uint64, tag = "4")]
    pub leader: u64,
}

/// An etcd member's gRPC client.
#[derive(Clone)]
pub struct Client(tonic::client::Grpc<Channel>);

impl Client {
    async fn call<Q, R>(&mut self, path: &'static str, req: Q) -> Result<R, tonic::Status>
    where
        Q: prost::Message + Send + Sync + 'static,
        R: prost::Message + Default + Send + Sync + 'static,
    {
        self.0
            .ready()
            .await
            .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        let codec = tonic_prost::ProstCodec::<Q, R>::default();
        self.0
            .unary(
                tonic::Request::new(req),
                PathAndQuery::from_static(path),
                codec,
            )
            .await
            .map(tonic::Response::into_inner)
    }

    pub async fn put(&mut self, key: &str, value: &str) -> Result<PutResponse, tonic::Status> {
        let req = PutRequest {
            key: key.as_bytes().to_vec(),
            value: value.as_bytes().to_vec(),
        };
        self.call("/etcdserverpb.KV/Put", req).await
    }

    /// A linearizable read of `key`.
    pub async fn get(&mut self, key: &str) -> Result<RangeResponse, tonic::Status> {
        let req = RangeRequest {
            key: key.as_bytes().to_vec(),
            serializable: false,
        };
        self.call("/etcdserverpb.KV/Range", req).await
    }

    pub async fn status(&mut self) -> Result<StatusResponse, tonic::Status> {
        self.call("/etcdserverpb.Maintenance/Status", StatusRequest {})
            .await
    }
}

/// Three etcd members; dropping it kills them.
pub struct Etcd {
    children: Vec<Child>,
    pub client_urls: Vec<String>,
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Whether an `etcd` binary is on the PATH.
pub fn available() -> bool {
    Command::new("etcd")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn port() -> Result<u16, String> {
    cluster_tests::free_port([127, 0, 0, 1])
        .map(|a| a.port())
        .map_err(|e| e.to_string())
}

impl Etcd {
    /// Start three members with their data (WAL fsynced per write, etcd's default) under
    /// `dir`; plain HTTP/2 on loopback (no TLS), heartbeat 100 ms, election 1000 ms.
    pub fn start(dir: &Path) -> Result<Etcd, String> {
        let ports: Vec<(u16, u16)> = (0..3)
            .map(|_| Ok((port()?, port()?)))
            .collect::<Result<_, String>>()?;
        let initial: Vec<String> = ports
            .iter()
            .enumerate()
            .map(|(i, (_, peer))| format!("e{i}=http://127.0.0.1:{peer}"))
            .collect();
        let mut e = Etcd {
            children: Vec::new(),
            client_urls: Vec::new(),
        };
        for (i, (client, peer)) in ports.iter().enumerate() {
            let data = dir.join(format!("etcd-{i}"));
            let log = std::fs::File::create(dir.join(format!("etcd-{i}.log")))
                .map_err(|e| e.to_string())?;
            let child = Command::new("etcd")
                .arg("--name")
                .arg(format!("e{i}"))
                .arg("--data-dir")
                .arg(&data)
                .arg("--listen-client-urls")
                .arg(format!("http://127.0.0.1:{client}"))
                .arg("--advertise-client-urls")
                .arg(format!("http://127.0.0.1:{client}"))
                .arg("--listen-peer-urls")
                .arg(format!("http://127.0.0.1:{peer}"))
                .arg("--initial-advertise-peer-urls")
                .arg(format!("http://127.0.0.1:{peer}"))
                .arg("--initial-cluster")
                .arg(initial.join(","))
                .arg("--initial-cluster-state")
                .arg("new")
                .arg("--heartbeat-interval")
                .arg("100")
                .arg("--election-timeout")
                .arg("1000")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .map_err(|e| format!("starting etcd: {e}"))?;
            e.children.push(child);
            e.client_urls.push(format!("http://127.0.0.1:{client}"));
        }
        Ok(e)
    }

    pub async fn client(&self, i: usize) -> Result<Client, String> {
        let ch = Endpoint::from_shared(self.client_urls[i].clone())
            .map_err(|e| e.to_string())?
            .tcp_nodelay(true)
            .connect()
            .await
            .map_err(|e| format!("connecting to etcd {}: {e}", self.client_urls[i]))?;
        Ok(Client(tonic::client::Grpc::new(ch)))
    }

    /// The index of the leader member, once all three answer and agree on one.
    pub async fn wait_leader(&self, timeout: Duration) -> Result<usize, String> {
        let start = Instant::now();
        let mut last = String::new();
        while start.elapsed() < timeout {
            let mut ids = Vec::new();
            let mut leaders = Vec::new();
            for i in 0..3 {
                match self.client(i).await {
                    Ok(mut c) => match c.status().await {
                        Ok(s) => {
                            ids.push(s.header.map_or(0, |h| h.member_id));
                            leaders.push(s.leader);
                        }
                        Err(e) => last = e.to_string(),
                    },
                    Err(e) => last = e,
                }
            }
            if leaders.len() == 3 && leaders[0] != 0 && leaders.iter().all(|l| *l == leaders[0]) {
                if let Some(i) = ids.iter().position(|id| *id == leaders[0]) {
                    return Ok(i);
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(format!("etcd elected no leader within {timeout:?}: {last}"))
    }
}
