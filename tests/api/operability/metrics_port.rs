//! The metrics port: every documented metric from startup, slow headers closed, connections capped per address.
use super::*;
use crate::binary::scrape_from;

/// Slowloris on `/metrics` (a port the Kubernetes Service exposes): connections that never
/// finish their headers are closed after a few seconds, and while more of them are open than
/// the endpoint serves at once, a scrape still gets through once they are.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_endpoint_closes_slow_headers_and_caps_connections() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut settings = test_settings(Mode::NoRedis);
    settings.metrics.max_connections = 4;
    settings.metrics.header_read_timeout = Duration::from_millis(500);
    let app = spawn_with(settings).await;
    let addr = app.metrics_addr.unwrap();
    let mut slow = Vec::new();
    for _ in 0..10 {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: authd\r\n")
            .await
            .unwrap();
        slow.push(stream);
    }
    // From another address (127.0.0.1 holds its 4 places): the scrape waits for a place.
    let scrape = tokio::time::timeout(Duration::from_secs(10), scrape_from(addr, [127, 0, 0, 2]))
        .await
        .expect("a scrape gets through once the slow connections are closed");
    assert!(scrape.contains("authd_"), "{scrape}");
    // The cap held: the endpoint serves 4 connections at once, and the first four slow ones
    // (accepted first: the others waited in the backlog behind them) held every place until
    // their headers timed out — so by the time the scrape was answered the server had closed
    // them (their end of stream is already here; a connection still open has nothing to read).
    for (i, stream) in slow.iter().take(4).enumerate() {
        let mut buf = [0u8; 256];
        let closed = !matches!(
            stream.try_read(&mut buf),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock
        );
        assert!(
            closed,
            "slow connection {i} was still open when the scrape was answered: the cap did not hold"
        );
    }
    // Every slow connection was closed by the server (EOF or reset), none left hanging.
    for mut stream in slow {
        let mut buf = [0u8; 256];
        let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await;
        assert!(
            read.is_ok(),
            "a connection with unfinished headers stays open"
        );
    }
}

/// Every metric the operations guide's table lists is on `/metrics` right after startup — its documented
/// label sets at 0 — so that `rate()` alerts and dashboards see 0 rather than nothing on a
/// healthy server. (Per-node Redis gauges follow the nodes; they are checked once the first
/// node check has run.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_documented_metric_is_present_from_startup() {
    let operations =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/operations.md"))
            .unwrap();
    let section = operations
        .split("\n## Metrics")
        .nth(1)
        .and_then(|rest| rest.split("\n## ").next())
        .expect("docs/operations.md has a Metrics section");
    let names: Vec<&str> = section
        .lines()
        .filter(|line| line.starts_with("| `authd_"))
        .flat_map(|line| line.split('|').nth(1).unwrap_or("").split(", "))
        .map(|name| name.trim().trim_matches('`'))
        .collect();
    assert!(names.len() >= 20, "{names:?}");
    let app = spawn_app(Mode::Redis).await;
    let text = app.metrics().await;
    let per_node = |name: &str| {
        name.starts_with("authd_redis_")
            && name != "authd_redis_up"
            && !name.starts_with("authd_redis_errors")
            && !name.starts_with("authd_redis_generation")
    };
    for name in names.iter().filter(|n| !per_node(n)) {
        assert!(
            text.lines().any(|l| l.starts_with(name)),
            "{name} is absent right after startup"
        );
    }
    for sample in [
        "authd_redis_errors_total{kind=\"timeout\"} 0",
        "authd_rate_limited_total{operation=\"login\"} 0",
        "authd_sessions_revoked_total{reason=\"admin\"} 0",
        "authd_cache_lookups_total{cache=\"profiles\",result=\"unavailable\"} 0",
        "authd_rpc_requests_total{code=\"Ok\",method=\"ValidateSession\",service=\"authd.v1.AuthService\"} 0",
    ] {
        assert!(text.contains(sample), "{sample} missing");
    }
    eventually(Duration::from_secs(10), "the per-node gauges", || async {
        let text = app.metrics().await;
        names
            .iter()
            .filter(|n| per_node(n))
            .all(|name| text.lines().any(|l| l.starts_with(name)))
    })
    .await;
}

/// Review found: the metrics port capped connections in all (16) but not per address: 16
/// keep-alive connections from one address, a GET every 3 s, left 4 of 4 outside scrapes
/// unanswered over 36 s. Now one address holds at most `METRICS__MAX_CONNECTIONS_PER_ADDRESS`
/// (4): the rest are closed at once, and a scrape from elsewhere is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_cannot_hold_the_metrics_port() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = spawn_app(Mode::NoRedis).await;
    let addr = app.metrics_addr.unwrap();
    let request = b"GET /metrics HTTP/1.1\r\nHost: authd\r\n\r\n";
    let mut held = Vec::new();
    for _ in 0..16 {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let _ = stream.write_all(request).await;
        held.push(stream);
    }
    // Keep every connection busy: read what each answered, ask again (as the attack did).
    let holding = tokio::spawn(async move {
        let mut buf = vec![0u8; 64 * 1024];
        let mut open = 0;
        for _ in 0..3 {
            open = 0;
            for stream in &mut held {
                let read = tokio::time::timeout(Duration::from_millis(200), stream.read(&mut buf));
                if matches!(read.await, Ok(Ok(1..))) && stream.write_all(request).await.is_ok() {
                    open += 1;
                }
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        (open, held)
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let scrape = tokio::time::timeout(Duration::from_secs(3), scrape_from(addr, [127, 0, 0, 2]))
        .await
        .expect("a scrape from another address is answered while 127.0.0.1 holds its share");
    assert!(scrape.contains("authd_"), "{scrape}");
    let (open, _held) = holding.await.unwrap();
    assert_eq!(open, 4, "127.0.0.1 holds its 4 places, no more");
}
