//! Reconnect storm: 1,000 lightweight protocol clients (the agent's backoff and reconnect
//! policy) reconnect after each of three gateway restarts. All must come back each time,
//! memory must stay bounded, and both the gateway's handshake admission limit and the clients'
//! full-jitter backoff must show in the numbers.

use std::time::Duration;

#[test]
fn a_thousand_clients_reconnect_after_a_gateway_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let opts = tether::bench::BenchOptions {
        storm_clients: 1_000,
        ..Default::default()
    };
    let path = dir.path().to_path_buf();
    let v = actix::System::new()
        .block_on(async move {
            // A quick client backoff (0.2 s doubling to 10 s): this checks that everyone comes
            // back each time, with memory bounded; `tether bench storm` measures the agent's.
            let backoff = (Duration::from_millis(200), Duration::from_secs(10));
            tether::bench::storm_rounds(&path, &opts, backoff, false).await
        })
        .expect("storm");
    let each: Vec<f64> = v["each_restart_s"]
        .as_array()
        .expect("rounds")
        .iter()
        .filter_map(|s| s.as_f64())
        .collect();
    assert_eq!(each.len(), 3, "{v}");
    let secs = each.iter().copied().fold(0.0, f64::max);
    let refused = v["refused_503"].as_u64().expect("refused");
    let before = v["rss_mb_before"].as_u64().expect("rss");
    let after = v["rss_mb_after"].as_u64().expect("rss");
    println!("{v}");
    assert!(
        secs < 30.0,
        "all 1,000 back in {secs} s after every restart: {v}"
    );
    // 1,000 clients against 200 handshakes/s: the admission limit turned some away, and the
    // clients' jittered retries spread the rest out (otherwise it would take one burst).
    assert!(refused > 0, "the admission limit was exercised: {v}");
    assert!(
        each.iter().all(|s| *s > 1.0),
        "reconnections were spread by admission and backoff: {v}"
    );
    assert!(
        after <= before + 150,
        "memory stayed bounded: {before} MB -> {after} MB"
    );
}
