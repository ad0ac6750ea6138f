//! Consistency seen by a client of one agent: a write through a follower is visible to a
//! read on that same follower as soon as the write is answered (read-your-writes).

use cluster_tests::{Cluster, Options};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_through_a_follower_is_read_back_from_that_follower() {
    let _serial = cluster_tests::serial().await;
    let mut c = Cluster::new(
        env!("CARGO_BIN_EXE_cluster-agent").into(),
        Options::default(),
    )
    .unwrap_or_else(|e| panic!("harness: {e}"));
    let r = c.form(3).await;
    let leader = c.check(r);
    let follower = if leader == 1 { 2 } else { 1 };
    // Each read comes right after its write's answer: without read-your-writes the
    // follower answers from a replica that has not applied the write yet (the leader
    // tells followers the new commit index only with its next message).
    for i in 0..40 {
        let key = format!("ryw-{i}");
        let value = format!("v{i}");
        let put = c.put(follower, &key, &value).await;
        let put = c.check(put);
        assert!(put.log_index > 0);
        let got = c.get(follower, &key).await;
        let got = c.check(got);
        assert_eq!(
            got.as_deref(),
            Some(value.as_str()),
            "write {i} (log index {}) through follower {follower} not read back there",
            put.log_index
        );
    }
}
