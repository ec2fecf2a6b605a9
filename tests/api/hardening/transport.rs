//! Finding 2: transport limits — streams past the limit, calls that never end, incomplete messages, silent sockets.
use super::*;

/// Before: no limit on the streams of one connection (tonic passes its unset
/// `max_concurrent_streams` to hyper as "none", overriding hyper's 200): one connection could
/// have any number of calls served at once. Now the server announces
/// `GRPC__MAX_CONCURRENT_STREAMS` in its SETTINGS and refuses a stream past it with
/// RST_STREAM(REFUSED_STREAM) — a client that ignores the announcement gets no more calls served
/// at once (well-behaved clients, tonic's included, queue them) — while the streams within it are
/// served, and a new stream is accepted once one of them ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_past_the_limit_are_refused_and_the_others_served() {
    let settings = test_settings(Mode::Redis);
    let server = Binary::start(binary::command(&settings, &redis_url())).await;
    let limit = settings.grpc.max_concurrent_streams;
    assert_eq!(limit, 100, "the default");
    let path = "/grpc.health.v1.Health/Check";
    let mut raw = RawH2::connect(&server.addr).await;
    let run = async {
        // The server's SETTINGS announce the limit.
        let announced = loop {
            let frame = raw.next().await;
            if frame.kind == SETTINGS && frame.flags & ACK == 0 {
                raw.send(SETTINGS, ACK, 0, &[]).await;
                break frame.payload.chunks(6).find_map(|s| {
                    (u16::from_be_bytes([s[0], s[1]]) == SETTINGS_MAX_CONCURRENT_STREAMS)
                        .then(|| u32::from_be_bytes([s[2], s[3], s[4], s[5]]))
                });
            }
        };
        assert_eq!(announced, Some(limit));
        // `limit` calls waiting for their request bodies, then two more.
        let ids: Vec<u32> = (0..limit + 2).map(|i| 2 * i + 1).collect();
        for id in &ids {
            raw.open(*id, path).await;
        }
        let beyond = &ids[ids.len() - 2..];
        let mut refused = BTreeSet::new();
        while refused.len() < beyond.len() {
            let frame = raw.next().await;
            if frame.kind == RST_STREAM {
                let code = u32::from_be_bytes(frame.payload[..4].try_into().unwrap());
                assert!(
                    beyond.contains(&frame.stream) && code == REFUSED_STREAM,
                    "stream {} reset with {code}",
                    frame.stream
                );
                refused.insert(frame.stream);
            }
        }
        // A call within the limit is served; once it ended, there is room for a new one.
        assert_eq!(raw.health_answer(ids[0]).await, SERVING_MESSAGE);
        let next = ids[ids.len() - 1] + 2;
        raw.open(next, path).await;
        assert_eq!(raw.health_answer(next).await, SERVING_MESSAGE);
    };
    tokio::time::timeout(Duration::from_secs(20), run)
        .await
        .expect("the server answered every frame in time");
    drop(server);
    drop_database(settings.database.url.expose_secret()).await;
}

/// Before: no server-side deadline; a call whose message never completes held its stream (and
/// what it had sent) forever. Then it ended at `GRPC__REQUEST_TIMEOUT` with CANCELLED (tonic's
/// server timeout), with no log line and no `authd_rpc_requests_total` sample (review of issue
/// 21). Now it answers DEADLINE_EXCEEDED, counted like every other call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_past_the_request_timeout_is_deadline_exceeded_and_counted() {
    let mut settings = test_settings(Mode::NoRedis);
    settings.grpc.request_timeout = Duration::from_secs(1);
    let app = spawn_with(settings).await;
    let call = incomplete_call(app.channel.clone(), LOGIN, incomplete_message(100, 10));
    let status = tokio::time::timeout(Duration::from_secs(15), call)
        .await
        .expect("the server ended the call")
        .expect("with a status");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    let counted = "authd_rpc_requests_total{code=\"DeadlineExceeded\",method=\"Login\",service=\"authd.v1.AuthService\"}";
    assert_eq!(app.metric(counted).await, 1.0);
    assert!(serving(app.channel.clone()).await);
}

/// The memory attack, against the binary in its own process. Before: 8 connections × 100 streams,
/// each announcing a 4 MiB message and sending part of it, took the server from ~35 to ~451 MiB
/// resident (every partial message buffered whole, windows large). Now a message announced over
/// `GRPC__MAX_MESSAGE_SIZE` is refused at its header — OUT_OF_RANGE, or, when the client keeps
/// sending on refused streams, h2 drops the connection (GOAWAY ENHANCE_YOUR_CALM
/// `too_many_data_frames`) — and streams holding a message of the largest size short of one byte
/// hold at most that each until the request timeout cancels them: resident memory grows by a few
/// MiB, not hundreds, and the server keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incomplete_messages_on_many_streams_do_not_grow_the_process() {
    const CONNECTIONS: usize = 8;
    const GROWTH_LIMIT_KIB: u64 = 64 * 1024;
    let settings = test_settings(Mode::Redis);
    let mut cmd = binary::command(&settings, &redis_url());
    cmd.env("GRPC__REQUEST_TIMEOUT", "3s");
    let server = Binary::start(cmd).await;
    let pid = pid_serving(&server.addr);
    let streams = settings.grpc.max_concurrent_streams as usize;
    let max = u32::try_from(settings.grpc.max_message_size).unwrap();

    // Warm up (first hash, pools), then take the settled size as the baseline.
    let _ = server
        .auth()
        .await
        .login(pb::LoginRequest {
            email: unique_email(),
            password: PASSWORD.into(),
            client: None,
        })
        .await;
    assert!(serving(connect(&server.addr).await).await);
    let mut baseline = u64::MAX;
    for _ in 0..20 {
        baseline = baseline.min(rss_kib(pid));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let peak = Arc::new(AtomicU64::new(baseline));
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = tokio::spawn({
        let (peak, stop) = (peak.clone(), stop.clone());
        async move {
            while !stop.load(Ordering::Relaxed) {
                peak.fetch_max(rss_kib(pid), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    });

    let attack = |start: Bytes| {
        let addr = server.addr.clone();
        async move {
            let channels = join_all((0..CONNECTIONS).map(|_| connect(&addr))).await;
            let calls = channels.iter().flat_map(|channel| {
                (0..streams)
                    .map(|_| tokio::spawn(incomplete_call(channel.clone(), LOGIN, start.clone())))
            });
            join_all(calls)
                .await
                .into_iter()
                .map(|call| call.unwrap().map(|status| status.code()))
                .collect::<Vec<_>>()
        }
    };
    let run = async {
        // 4 MiB announced, 1 MiB sent: refused at the header.
        let ends = attack(incomplete_message(4 << 20, 1 << 20)).await;
        let refused = ends
            .iter()
            .filter(|e| matches!(e, Ok(Code::OutOfRange)))
            .count();
        let dropped = ends.iter().filter(|e| e.is_err()).count();
        eprintln!("announced 4 MiB: {refused} OUT_OF_RANGE, {dropped} on dropped connections");
        assert!(refused > 0 && refused + dropped == ends.len(), "{ends:?}");
        let after_refusals = peak.load(Ordering::Relaxed);
        // The largest message allowed, all but its last byte: held until the request timeout.
        let ends = attack(incomplete_message(max, max as usize - 1)).await;
        assert!(
            ends.iter().all(|e| matches!(e, Ok(Code::DeadlineExceeded))),
            "{ends:?}"
        );
        after_refusals
    };
    let after_refusals = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("every call ended");
    stop.store(true, Ordering::Relaxed);
    sampler.await.unwrap();
    let peak = peak.load(Ordering::Relaxed);
    eprintln!(
        "authd RSS: {baseline} KiB settled, peak {after_refusals} KiB after the 4 MiB \
         announcements, {peak} KiB after the held streams"
    );
    assert!(
        peak.saturating_sub(baseline) < GROWTH_LIMIT_KIB,
        "RSS grew from {baseline} KiB to {peak} KiB"
    );
    // Still healthy, on a new connection.
    assert!(serving(connect(&server.addr).await).await);
    drop(server);
    drop_database(settings.database.url.expose_secret()).await;
}

/// Before: connections were capped in all, not per client: one host opening
/// `GRPC__MAX_CONNECTIONS` silent sockets (a few kilobytes each) locked every other client out
/// for as long as it liked. Now one address holds at most `GRPC__MAX_CONNECTIONS_PER_ADDRESS`
/// places (a connection over its share is closed at once), and a connection that sends nothing
/// is closed after the first-byte timeout: other clients are served throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_sockets_from_one_address_do_not_lock_others_out() {
    let mut settings = test_settings(Mode::NoRedis);
    settings.grpc.max_connections = 6;
    settings.grpc.max_connections_per_address = 4;
    let app = spawn_with(settings).await;
    let open = || async {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        socket.connect(app.addr).await.unwrap()
    };
    let opened = Instant::now();
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(open().await);
    }
    // Over the address's share: closed at once.
    for _ in 0..3 {
        let mut over = open().await;
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(2), over.read(&mut byte)).await;
        assert!(
            matches!(read, Ok(Ok(0) | Err(_))),
            "a connection over the share is closed at once: {read:?}"
        );
    }
    // One byte (the start of a preface) does not hold a place either: it is closed like the
    // silent ones. (127.0.0.3: an address of its own.)
    let mut one_byte = {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.3:0".parse().unwrap()).unwrap();
        socket.connect(app.addr).await.unwrap()
    };
    one_byte.write_all(b"P").await.unwrap();
    // Another client (127.0.0.1) is served while the four are held.
    assert!(serving(connect(&app.addr.to_string()).await).await);
    // The silent ones are closed after the first-byte timeout (the server's own SETTINGS
    // frame comes first).
    held.push(one_byte);
    for mut socket in held {
        let mut sent = Vec::new();
        let read =
            tokio::time::timeout(Duration::from_secs(10), socket.read_to_end(&mut sent)).await;
        assert!(read.is_ok(), "a silent connection is closed: {read:?}");
    }
    // Not before the first-byte timeout (each was closed within the 10 s read above).
    let closed_after = opened.elapsed();
    assert!(
        closed_after >= Duration::from_secs(4),
        "silent connections closed after {closed_after:?}"
    );
    // Their places are free again: the address's new connections are kept open.
    let mut again = Vec::new();
    for _ in 0..4 {
        let mut socket = open().await;
        let mut sent = Vec::new();
        let read =
            tokio::time::timeout(Duration::from_secs(1), socket.read_to_end(&mut sent)).await;
        assert!(
            read.is_err(),
            "a connection within the share stays open: {read:?}"
        );
        again.push(socket);
    }
}
