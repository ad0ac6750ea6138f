//! The role lists name methods that exist: a renamed service or rpc must not leave a
//! stale path behind (a viewer would lose a read, or the list would name nothing).

use prost::Message;

/// Every `/package.Service/Method` path of the compiled .proto files.
fn method_paths() -> Vec<String> {
    let set = prost_types::FileDescriptorSet::decode(cluster_proto::FILE_DESCRIPTOR_SET)
        .unwrap_or_else(|e| panic!("the descriptor set decodes: {e}"));
    let mut paths = Vec::new();
    for file in set.file {
        for service in &file.service {
            for method in &service.method {
                paths.push(format!(
                    "/{}.{}/{}",
                    file.package(),
                    service.name(),
                    method.name()
                ));
            }
        }
    }
    paths
}

#[test]
fn read_only_methods_and_management_services_exist() {
    let paths = method_paths();
    for m in cluster_proto::READ_ONLY_METHODS {
        assert!(
            paths.iter().any(|p| p == m),
            "{m} is not a method: {paths:?}"
        );
    }
    for s in cluster_proto::MANAGEMENT_SERVICES {
        assert!(
            paths.iter().any(|p| p.starts_with(&format!("/{s}/"))),
            "{s} is not a service"
        );
    }
    assert!(
        cluster_proto::MANAGEMENT_SERVICES
            .iter()
            .all(|s| !s.starts_with("cluster.raft.")),
        "the peer-only Raft service is not a management service"
    );
}

/// Reads that only admins may make.
const ADMIN_READS: &[&str] = &["/cluster.management.v1.ManagementService/ListRevocations"];

#[test]
fn every_get_list_and_watch_of_the_management_plane_is_read_only() {
    for p in method_paths() {
        if ADMIN_READS.contains(&p.as_str()) {
            continue;
        }
        let method = p.rsplit('/').next().unwrap_or_default();
        let management = cluster_proto::MANAGEMENT_SERVICES
            .iter()
            .any(|s| p.starts_with(&format!("/{s}/")));
        if management
            && ["Get", "List", "Watch"]
                .iter()
                .any(|v| method.starts_with(v))
        {
            assert!(
                cluster_proto::READ_ONLY_METHODS.contains(&p.as_str()),
                "{p} reads but a viewer may not call it"
            );
        }
    }
}
