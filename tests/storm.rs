//! Reconnect storm: 1,000 lightweight protocol clients reconnect after a gateway restart.
//! All must come back, memory must stay bounded, and both the gateway's handshake admission
//! limit and the clients' full-jitter backoff must show in the numbers.

#[test]
fn a_thousand_clients_reconnect_after_a_gateway_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let opts = tether::bench::BenchOptions {
        storm_clients: 1_000,
        ..Default::default()
    };
    let path = dir.path().to_path_buf();
    let v = actix::System::new()
        .block_on(async move { tether::bench::storm(&path, &opts).await })
        .expect("storm");
    let secs = v["seconds_until_all_back"].as_f64().expect("secs");
    let refused = v["refused_503"].as_u64().expect("refused");
    let before = v["rss_mb_before"].as_u64().expect("rss");
    let after = v["rss_mb_after"].as_u64().expect("rss");
    println!("{v}");
    assert!(secs < 30.0, "all 1,000 back in {secs} s");
    // 1,000 clients against 200 handshakes/s: the admission limit turned some away, and the
    // clients' jittered retries spread the rest out (otherwise it would take one burst).
    assert!(refused > 0, "the admission limit was exercised: {v}");
    assert!(
        secs > 1.0,
        "reconnections were spread by admission and backoff: {v}"
    );
    assert!(
        after <= before + 150,
        "memory stayed bounded: {before} MB -> {after} MB"
    );
}
