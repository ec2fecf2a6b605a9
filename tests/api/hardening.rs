//! Issue 11, hardening: what a caller (or an operator watching the process) observes of each
//! attack the hardening commit fixed — requests with thousands of fields or over the message size,
//! HTTP/2 abuse (streams past the limit, incomplete messages, calls that never end), oversized
//! passwords, hashing monopolised from one address, unauthenticated traffic filling Redis, a full
//! Redis, lockouts by strangers, and addresses written several ways. Each test says what happened
//! before the fix.
//!
//! Finding 6 (the in-process limiter map is bounded and fails closed) is covered by the unit test
//! `cache::rate_limit::tests::the_map_is_bounded_and_fails_closed`: reaching `LOCAL_MAX` buckets
//! over gRPC would take 100,000 password hashes.
use std::{
    collections::BTreeSet,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use authd::proto::authd::v1 as pb;
use axum::body::Bytes;
use fred::interfaces::{ClientLike, KeysInterface};
use futures::{StreamExt, future::join_all};
use secrecy::{ExposeSecret, SecretString};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use tonic::{Code, Status, codegen::Service, transport::Channel};
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};
use tonic_types::StatusExt;

use crate::{
    binary::{self, BIN, Binary},
    both_modes,
    helpers::{
        Mode, PASSWORD, TableLock, TestApp, assert_code, drop_database, redis_client, redis_url,
        register_request, spawn_sharing, spawn_with, test_settings, unique_email, violation_fields,
    },
    redis_server::RedisServer,
};

both_modes!(
    correct_logins_from_one_address_are_limited_too,
    guesses_from_elsewhere_do_not_lock_out_a_trusted_device,
    consecutive_failures_lock_out_untrusted_clients_only,
    no_window_edge_lets_twice_the_limit_through,
    addresses_are_counted_in_their_canonical_form_and_per_ipv6_64,
    requests_without_an_address_share_one_bucket,
    a_trusted_address_is_that_address_not_its_network,
    password_changes_pay_a_bucket_that_a_correct_password_does_not_refund,
);

// ---------------------------------------------------------------------------------------------
// Helpers of this file.

/// What an error status costs to send: its message (a header) and its details (another one).
fn status_size(status: &Status) -> usize {
    status.message().len() + status.details().len()
}

fn client(ip: &str, device: &str) -> pb::ClientInfo {
    pb::ClientInfo {
        ip_address: ip.to_owned(),
        user_agent: "authd-tests/1.0".to_owned(),
        device_id: device.to_owned(),
    }
}

async fn login_as(
    app: &TestApp,
    email: &str,
    password: &str,
    client: pb::ClientInfo,
) -> Result<pb::LoginResponse, Status> {
    app.auth
        .clone()
        .login(pb::LoginRequest {
            email: email.to_owned(),
            password: password.to_owned(),
            client: Some(client),
        })
        .await
        .map(|r| r.into_inner())
}

/// RESOURCE_EXHAUSTED with a `RetryInfo` (a rate limit, not the hashing queue or the lock).
fn assert_limited(result: Result<impl std::fmt::Debug, Status>) {
    let status = assert_code(result, Code::ResourceExhausted);
    let retry = status.get_details_retry_info().expect("RetryInfo attached");
    assert!(retry.retry_delay.is_some(), "{retry:?}");
}

/// The keys of one Redis server under `prefix`.
async fn keys_under(redis: &fred::clients::Client, prefix: &str) -> BTreeSet<String> {
    let keys: Vec<String> = redis
        .custom(fred::cmd!("KEYS"), vec![format!("{prefix}*")])
        .await
        .unwrap();
    keys.into_iter().collect()
}

const LOGIN: &str = "/authd.v1.AuthService/Login";

/// The start of a gRPC message: its frame header announcing `announced` bytes, then `sent` bytes
/// of it (one buffer, so it goes out in large DATA frames, as a fast attacker's would).
fn incomplete_message(announced: u32, sent: usize) -> Bytes {
    let mut message = vec![0u8];
    message.extend_from_slice(&announced.to_be_bytes());
    message.resize(5 + sent, 7);
    Bytes::from(message)
}

/// Starts a unary call whose request body is `start` (see [`incomplete_message`]) and then nothing
/// ever again: a message that never completes. Resolves with the status the server ends the call
/// with, or `Err` when the server dropped the connection instead.
async fn incomplete_call(
    mut channel: Channel,
    path: &str,
    start: Bytes,
) -> Result<Status, tonic::transport::Error> {
    let chunks = futures::stream::iter([Ok(start)])
        .chain(futures::stream::pending::<Result<Bytes, std::io::Error>>());
    let body = tonic::body::Body::new(axum::body::Body::from_stream(chunks));
    let request = http::Request::builder()
        .method("POST")
        .uri(path)
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(body)
        .unwrap();
    std::future::poll_fn(|cx| Service::poll_ready(&mut channel, cx)).await?;
    let response = Service::call(&mut channel, request).await?;
    if let Some(status) = Status::from_header_map(response.headers()) {
        return Ok(status);
    }
    let mut body = response.into_body();
    while let Some(frame) =
        std::future::poll_fn(|cx| tonic::codegen::Body::poll_frame(Pin::new(&mut body), cx)).await
    {
        if let Ok(trailers) = frame
            .expect("the response body is readable")
            .into_trailers()
        {
            return Ok(Status::from_header_map(&trailers).expect("grpc-status in the trailers"));
        }
    }
    panic!("the call ended without a grpc-status");
}

async fn connect(addr: &str) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .expect("connects")
}

async fn serving(channel: Channel) -> bool {
    tonic_health::pb::health_client::HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .is_ok_and(|r| r.into_inner().status() == ServingStatus::Serving)
}

/// The process id of the `authd` binary serving on `addr` (a child of this test process; its
/// environment names the address).
fn pid_serving(addr: &str) -> u32 {
    let needle = format!("GRPC__ADDR={addr}");
    let bin = std::fs::canonicalize(BIN).unwrap();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let exe = std::fs::read_link(entry.path().join("exe")).ok();
        let Ok(environ) = std::fs::read(entry.path().join("environ")) else {
            continue;
        };
        if exe.as_deref() == Some(bin.as_path())
            && environ.split(|b| *b == 0).any(|kv| kv == needle.as_bytes())
        {
            return pid;
        }
    }
    panic!("no authd process serving {addr}");
}

/// Resident memory of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/<pid>/status")
}

/// A bare HTTP/2 client writing frames itself (literal HPACK, no flow control, no decoding of
/// the server's headers): enough to open more streams than the server allows, which a
/// well-behaved client never does.
struct RawH2 {
    io: TcpStream,
}

struct Frame {
    kind: u8,
    flags: u8,
    stream: u32,
    payload: Vec<u8>,
}

const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const GOAWAY: u8 = 0x7;
const END_STREAM: u8 = 0x1;
const ACK: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const SETTINGS_MAX_CONCURRENT_STREAMS: u16 = 0x3;
const REFUSED_STREAM: u32 = 0x7;

impl RawH2 {
    async fn connect(addr: &str) -> Self {
        let mut io = TcpStream::connect(addr).await.unwrap();
        io.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .await
            .unwrap();
        let mut raw = Self { io };
        raw.send(SETTINGS, 0, 0, &[]).await;
        raw
    }

    async fn send(&mut self, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
        let len = u32::try_from(payload.len()).unwrap();
        let mut frame = len.to_be_bytes()[1..].to_vec();
        frame.extend([kind, flags]);
        frame.extend(stream.to_be_bytes());
        frame.extend(payload);
        self.io.write_all(&frame).await.unwrap();
    }

    async fn next(&mut self) -> Frame {
        let mut head = [0u8; 9];
        self.io
            .read_exact(&mut head)
            .await
            .expect("the server keeps the connection open");
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        let mut payload = vec![0; len];
        self.io.read_exact(&mut payload).await.unwrap();
        let frame = Frame {
            kind: head[3],
            flags: head[4],
            stream,
            payload,
        };
        assert_ne!(frame.kind, GOAWAY, "the server closed the connection");
        frame
    }

    /// Opens stream `id` as a call of `path`; its request body is still to come.
    async fn open(&mut self, id: u32, path: &str) {
        let mut block = Vec::new();
        for (name, value) in [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", path),
            (":authority", "authd"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ] {
            // A literal header field without indexing, with a literal name (RFC 7541 6.2.2).
            block.push(0);
            for s in [name, value] {
                block.push(u8::try_from(s.len()).ok().filter(|n| *n < 127).unwrap());
                block.extend_from_slice(s.as_bytes());
            }
        }
        self.send(HEADERS, END_HEADERS, id, &block).await;
    }

    /// Sends an empty HealthCheckRequest (service "") on the open stream `id`, ends the request
    /// and returns the response message (as framed by gRPC).
    async fn health_answer(&mut self, id: u32) -> Vec<u8> {
        self.send(DATA, END_STREAM, id, &[0, 0, 0, 0, 0]).await;
        let mut data = Vec::new();
        while data.len() < SERVING_MESSAGE.len() {
            let frame = self.next().await;
            assert!(
                frame.kind != RST_STREAM || frame.stream != id,
                "stream {id} reset"
            );
            if frame.kind == DATA && frame.stream == id {
                data.extend(frame.payload);
            }
        }
        data
    }
}

/// The response message of a health check that answered SERVING, as framed by gRPC.
const SERVING_MESSAGE: [u8; 7] = [0, 0, 0, 0, 2, 0x08, 0x01];

// ---------------------------------------------------------------------------------------------
// Finding 1: requests with thousands of fields, and requests over the message size.

/// Before: every unknown or empty path of the mask became a violation — 5000 paths made a status
/// message and details of hundreds of KiB — and the mask was parsed before the token was even
/// looked at, so a caller without a token could have it done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mask_of_thousands_of_paths_gets_one_small_violation_after_the_token_check() {
    let app = spawn_with(test_settings(Mode::NoRedis)).await;
    let (_, reg) = app.register().await;
    let empty: Vec<String> = vec![String::new(); 5000];
    let unknown: Vec<String> = (0..1500).map(|i| format!("p{i:05}")).collect();
    for paths in [empty, unknown] {
        let request = |token: &str| pb::UpdateProfileRequest {
            session_token: token.to_owned(),
            profile: Some(pb::Profile::default()),
            update_mask: Some(prost_types::FieldMask {
                paths: paths.clone(),
            }),
            expected_version: 0,
        };
        // A token that cannot be one is refused before the mask is looked at.
        assert_code(
            app.profiles
                .clone()
                .update_profile(request("not-a-token"))
                .await,
            Code::Unauthenticated,
        );
        let status = assert_code(
            app.profiles
                .clone()
                .update_profile(request(&reg.session_token))
                .await,
            Code::InvalidArgument,
        );
        assert_eq!(violation_fields(&status), ["update_mask"], "{status:?}");
        assert!(
            status_size(&status) < 2048,
            "{} bytes",
            status_size(&status)
        );
    }
    // Nothing changed.
    assert_eq!(app.get_profile(&reg.user_id).await.unwrap().version, 1);
}

/// Before: all 100 malformed ids became a violation each (~6 KiB of message and details).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_malformed_ids_gets_a_bounded_list_of_violations() {
    let app = spawn_with(test_settings(Mode::NoRedis)).await;
    let ids: Vec<String> = (0..100).map(|i| format!("not-a-uuid-{i}")).collect();
    let status = assert_code(app.batch_get(&ids).await, Code::InvalidArgument);
    let fields = violation_fields(&status);
    assert!(
        !fields.is_empty() && fields.len() <= authd::auth::input::MAX_VIOLATIONS,
        "{fields:?}"
    );
    assert!(
        fields.iter().all(|f| f.starts_with("user_ids[")),
        "{fields:?}"
    );
    assert!(
        status_size(&status) < 2048,
        "{} bytes",
        status_size(&status)
    );
}

/// Before: tonic's 4 MiB default; now `GRPC__MAX_MESSAGE_SIZE` (16 KiB): a larger request gets
/// OUT_OF_RANGE (tonic's code for a message over the decoding limit) and the connection and the
/// server carry on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_over_the_message_size_is_out_of_range_and_the_server_carries_on() {
    let app = spawn_with(test_settings(Mode::NoRedis)).await;
    assert_eq!(app.settings.grpc.max_message_size, 16 * 1024);
    let (_, reg) = app.register().await;
    let big = pb::Profile {
        bio: "x".repeat(app.settings.grpc.max_message_size + 1),
        ..pb::Profile::default()
    };
    let status = assert_code(
        app.update_profile(&reg.session_token, big, &["bio"], 0)
            .await,
        Code::OutOfRange,
    );
    assert!(status_size(&status) < 2048, "{status:?}");
    // The same connection still serves, and so does the service.
    assert!(serving(app.channel.clone()).await);
    let small = pb::Profile {
        bio: "fits".into(),
        ..pb::Profile::default()
    };
    let updated = app
        .update_profile(&reg.session_token, small, &["bio"], 0)
        .await
        .unwrap();
    assert_eq!((updated.bio.as_str(), updated.version), ("fits", 2));
}

// ---------------------------------------------------------------------------------------------
// Finding 2: transport limits.

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

// ---------------------------------------------------------------------------------------------
// Finding 3: oversized passwords.

/// 57 Hangul syllables written as conjoining jamo: 513 bytes (one over the byte bound of a
/// 128-character password), but 57 characters once NFKC composes them. A bound counted after
/// normalisation lets it through; the byte bound, checked before any normalisation, does not.
fn over_the_byte_bound() -> String {
    let password = "\u{1112}\u{1161}\u{11AB}".repeat(57);
    assert_eq!(
        password.len(),
        authd::auth::input::PASSWORD_MAX_CHARS * 4 + 1
    );
    password
}

/// Before: a password's length was only counted after NFKC normalisation (of up to 4 MiB of
/// input: U+FDFA expands 18-fold), so the 513-byte password above passed as 57 characters: Login
/// answered UNAUTHENTICATED after a hash, ChangePassword looked the token up first. Now the byte
/// bound rejects it before anything else, naming the field — for Login, Register and both fields
/// of ChangePassword, whatever the token (the fields are checked before it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passwords_over_the_byte_bound_are_refused_before_anything_else() {
    let app = spawn_with(test_settings(Mode::NoRedis)).await;
    let (email, reg) = app.register().await;
    let long = over_the_byte_bound();
    let expanding = "\u{FDFA}".repeat(171); // 513 bytes, 3078 characters after NFKC
    for password in [&long, &expanding] {
        let status = assert_code(app.login(&email, password).await, Code::InvalidArgument);
        assert_eq!(violation_fields(&status), ["password"]);
        let mut request = register_request(&unique_email());
        request.password = password.clone();
        let status = assert_code(
            app.auth.clone().register(request).await,
            Code::InvalidArgument,
        );
        assert_eq!(violation_fields(&status), ["password"]);
        for token in ["not-a-token", reg.session_token.as_str()] {
            let status = assert_code(
                app.change_password(token, password, password).await,
                Code::InvalidArgument,
            );
            assert_eq!(
                violation_fields(&status),
                ["current_password", "new_password"],
                "token {token:?}"
            );
            let status = assert_code(
                app.change_password(token, PASSWORD, password).await,
                Code::InvalidArgument,
            );
            assert_eq!(violation_fields(&status), ["new_password"]);
        }
    }
    // Nothing was changed.
    app.login(&email, PASSWORD).await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// Finding 4: hashing monopolised from one address.

/// Before: only failed logins counted against the client's address, so accounts of one's own
/// logging in correctly in a loop from one address got every hash they asked for. Now every
/// Login pays the address's bucket (`RATE_LIMIT__LOGIN_PER_IP`, at most that many in any
/// window): the loop is refused with RESOURCE_EXHAUSTED (counted in
/// `authd_rate_limited_total{operation="login"}`), and other addresses are not affected.
async fn correct_logins_from_one_address_are_limited_too(mode: Mode) {
    let mut settings = test_settings(mode);
    settings.rate_limit.login_per_ip = 10;
    let app = spawn_with(settings).await;
    let mut emails = Vec::new();
    for _ in 0..3 {
        emails.push(app.register().await.0);
    }
    let metric = "authd_rate_limited_total{operation=\"login\"}";
    let before = app.metric(metric).await;
    let (mut served, mut refused) = (0, 0);
    for i in 0..15 {
        match app
            .login_from(&emails[i % emails.len()], PASSWORD, "198.51.100.20")
            .await
        {
            Ok(_) => served += 1,
            other => {
                assert_limited(other);
                refused += 1;
            }
        }
    }
    assert!((1..=10).contains(&served), "{served} logins served");
    assert!(refused >= 5, "{refused} refused");
    assert_eq!(app.metric(metric).await - before, f64::from(refused));
    app.login_from(&emails[0], PASSWORD, "198.51.100.21")
        .await
        .expect("another address is not limited");
}

/// Before: Register hashed the password first and found the email taken only when inserting, so
/// Registers of an existing email took hashing slots (and were refused when the slots were
/// busy). Now the cheap uniqueness check comes first: with one hashing slot and no queue, 20
/// concurrent Registers of a taken email all answer ALREADY_EXISTS and no hash is refused —
/// while 20 concurrent Logins, which do hash, are.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registering_a_taken_email_takes_no_hashing_slot() {
    let mut settings = test_settings(Mode::NoRedis);
    settings.auth.hash_concurrency = 1;
    settings.auth.hash_queue = 0;
    let app = spawn_with(settings).await;
    let (email, _) = app.register().await;
    let rejections = "authd_password_hash_rejections_total";
    assert_eq!(app.metric(rejections).await, 0.0);
    let registers = join_all((0..20).map(|_| {
        let mut auth = app.auth.clone();
        let request = register_request(&email);
        async move { auth.register(request).await }
    }))
    .await;
    for register in registers {
        assert_code(register, Code::AlreadyExists);
    }
    assert_eq!(app.metric(rejections).await, 0.0, "no hash was asked for");
    // The same concurrency with hashing does overflow the one slot.
    let logins = join_all((0..20).map(|_| app.login(&email, PASSWORD))).await;
    assert!(
        logins.iter().any(|l| l
            .as_ref()
            .is_err_and(|s| s.code() == Code::ResourceExhausted)),
        "{logins:?}"
    );
    assert!(app.metric(rejections).await > 0.0);
}

// ---------------------------------------------------------------------------------------------
// Finding 5: unauthenticated traffic and Redis.

/// Before: every unknown id of a BatchGetProfiles was cached in Redis as "not found"
/// (`<prefix>profile:v2:<id>`), so anyone could fill Redis with random ids. Negative entries are
/// kept in process now: no profile key is written for an unknown id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_profile_ids_write_nothing_to_redis() {
    let app = spawn_with(test_settings(Mode::Redis)).await;
    let redis = redis_client(&redis_url()).await;
    let prefix = app.settings.redis.key_prefix.clone();
    let before = keys_under(&redis, &prefix).await;
    let ids: Vec<String> = (0..100).map(|_| uuid::Uuid::new_v4().to_string()).collect();
    for _ in 0..2 {
        let batch = app.batch_get(&ids).await.unwrap();
        assert_eq!(batch.not_found_user_ids.len(), 100);
    }
    assert_code(app.get_profile(&ids[0]).await, Code::NotFound);
    let added: Vec<_> = keys_under(&redis, &prefix)
        .await
        .difference(&before)
        .cloned()
        .collect();
    assert!(added.is_empty(), "keys written for unknown ids: {added:?}");
    let _ = redis.quit().await;
}

/// Before: every Login counted in the email's counter before the address's limit was looked at,
/// so logins refused by the address limit still created one Redis key per (fresh) email. Now the
/// address is checked first and a refusal stops there: no key is created, and no PostgreSQL query
/// is made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logins_refused_by_the_address_limit_create_no_keys() {
    let mut settings = test_settings(Mode::Redis);
    settings.rate_limit.login_per_ip = 2;
    let app = spawn_with(settings).await;
    let redis = redis_client(&redis_url()).await;
    let prefix = app.settings.redis.key_prefix.clone();
    let ip = "198.51.100.30";
    assert_code(
        app.login_from(&unique_email(), PASSWORD, ip).await,
        Code::Unauthenticated,
    );
    let before = keys_under(&redis, &prefix).await;
    let queries = app.queries();
    for _ in 0..30 {
        assert_limited(app.login_from(&unique_email(), PASSWORD, ip).await);
    }
    assert_eq!(keys_under(&redis, &prefix).await, before);
    assert_eq!(app.queries(), queries, "refused before any database work");
    let _ = redis.quit().await;
}

/// Before: when Redis refused writes (maxmemory reached, `noeviction`), the counting script failed
/// and the limiter fell back to in-process counters — empty on every instance — so an account
/// locked in Redis was open again. Now the buckets are still read in Redis (a read-only script):
/// the lock holds on every instance, including one that never saw the guesses, while an account
/// that is not locked logs in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_redis_still_enforces_a_lock_recorded_before_it_filled() {
    let server = RedisServer::start_with(
        false,
        &["--maxmemory", "4mb", "--maxmemory-policy", "noeviction"],
    )
    .await;
    let mut settings = test_settings(Mode::Redis);
    settings.redis.url = SecretString::from(server.url());
    settings.rate_limit.login_per_email = 4;
    settings.rate_limit.login_window = Duration::from_secs(3600);
    let a = spawn_with(settings).await;
    let b = spawn_sharing(&a, |_| {}).await;
    let (email, _) = a.register().await;
    let (other, _) = a.register().await;
    for _ in 0..2 {
        assert_code(a.login(&email, "wrong guess").await, Code::Unauthenticated);
    }
    assert_limited(a.login(&email, PASSWORD).await);

    let redis = redis_client(&server.url()).await;
    let ballast = "x".repeat(512 * 1024);
    let mut keys = Vec::new();
    loop {
        let key = format!("ballast:{}", keys.len());
        let filled: Result<(), _> = redis.set(&key, ballast.as_str(), None, None, false).await;
        if filled.is_err() {
            break;
        }
        keys.push(key);
    }
    for app in [&b, &a] {
        assert_limited(app.login(&email, PASSWORD).await);
    }
    b.login(&other, PASSWORD)
        .await
        .expect("an account that is not locked logs in");
    let _: i64 = redis.del(keys).await.unwrap();
    let _ = redis.quit().await;
}

// ---------------------------------------------------------------------------------------------
// Finding 7: lockouts.

/// Before: one counter per email: a stranger's guesses locked the owner out too, for the whole
/// window. Now a client that signed in to the account before (here by its device identifier) has
/// a bucket of its own there: the stranger is refused, and so is anyone else untrusted, but the
/// owner's device gets in (even from a new address).
async fn guesses_from_elsewhere_do_not_lock_out_a_trusted_device(mode: Mode) {
    let mut settings = test_settings(mode);
    settings.rate_limit.login_per_email = 4;
    settings.rate_limit.login_window = Duration::from_secs(3600);
    let app = spawn_with(settings).await;
    let (email, _) = app.register().await;
    let laptop = || client("192.0.2.10", "owner-laptop-1");
    login_as(&app, &email, PASSWORD, laptop()).await.unwrap();

    let stranger = || client("203.0.113.66", "stranger");
    for _ in 0..2 {
        assert_code(
            login_as(&app, &email, "guess", stranger()).await,
            Code::Unauthenticated,
        );
    }
    assert_limited(login_as(&app, &email, "guess", stranger()).await);
    assert_limited(login_as(&app, &email, PASSWORD, client("203.0.113.67", "")).await);

    let travelling = client("198.51.100.200", "owner-laptop-1");
    login_as(&app, &email, PASSWORD, travelling)
        .await
        .expect("the owner's device is not locked out");
    login_as(&app, &email, PASSWORD, laptop()).await.unwrap();
    assert_limited(login_as(&app, &email, PASSWORD, stranger()).await);
}

/// Before: no cap on consecutive failures beyond the window's count. Now, with per-window
/// limits far away, `RATE_LIMIT__MAX_FAILED_LOGINS` consecutive wrong passwords (kept in
/// PostgreSQL) make the account refuse the right password from any client it does not trust
/// (RESOURCE_EXHAUSTED), while its owner's device still gets in.
async fn consecutive_failures_lock_out_untrusted_clients_only(mode: Mode) {
    let mut settings = test_settings(mode);
    settings.rate_limit.login_per_email = 1000;
    settings.rate_limit.max_failed_logins = 5;
    let app = spawn_with(settings).await;
    let (email, _) = app.register().await;
    let phone = || client("192.0.2.10", "owner-phone");
    login_as(&app, &email, PASSWORD, phone()).await.unwrap();
    for i in 0..5 {
        assert_code(
            login_as(&app, &email, "guess", client(&format!("203.0.113.{i}"), "")).await,
            Code::Unauthenticated,
        );
    }
    assert_code(
        login_as(&app, &email, PASSWORD, client("203.0.113.99", "")).await,
        Code::ResourceExhausted,
    );
    assert_code(
        login_as(&app, &email, PASSWORD, client("203.0.113.99", "new-device")).await,
        Code::ResourceExhausted,
    );
    login_as(&app, &email, PASSWORD, phone())
        .await
        .expect("the trusted device still gets in");
}

/// Before: fixed windows: `limit` guesses just before a window ended and `limit` more just after
/// it began — twice the limit within moments. Now (GCRA) at most `limit` guesses are evaluated in
/// any window: one guess, a pause to just before the window's end, then guesses as fast as
/// possible: in no stretch shorter than a window are more than `limit` evaluated, and guesses
/// keep being evaluated at the steady rate.
async fn no_window_edge_lets_twice_the_limit_through(mode: Mode) {
    const LIMIT: usize = 4;
    const WINDOW: Duration = Duration::from_secs(2);
    let mut settings = test_settings(mode);
    settings.rate_limit.login_per_email = LIMIT as u32;
    settings.rate_limit.login_window = WINDOW;
    let app = spawn_with(settings).await;
    let (email, _) = app.register().await;
    let start = Instant::now();
    let mut evaluated = Vec::new();
    assert_code(app.login(&email, "guess").await, Code::Unauthenticated);
    evaluated.push(start);
    tokio::time::sleep(WINDOW - Duration::from_millis(200)).await;
    while start.elapsed() < WINDOW * 5 / 2 {
        let sent = Instant::now();
        match app.login(&email, "guess").await {
            Err(s) if s.code() == Code::Unauthenticated => evaluated.push(sent),
            other => assert_limited(other),
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Send times, not evaluation times: a stretch of a window less a margin for the time from
    // sending to counting.
    let stretch = WINDOW - Duration::from_millis(300);
    for (i, first) in evaluated.iter().enumerate() {
        let within = evaluated[i..]
            .iter()
            .take_while(|t| t.duration_since(*first) <= stretch)
            .count();
        assert!(
            within <= LIMIT,
            "{within} guesses evaluated within {stretch:?} (from {:?})",
            first.duration_since(start)
        );
    }
    // Burst, then one per window / (limit - burst + 1): about 7 in these 5 s.
    assert!(evaluated.len() >= 5, "{} evaluated", evaluated.len());
    let last = evaluated.last().unwrap().duration_since(start);
    assert!(last > WINDOW * 3 / 2, "nothing evaluated after {last:?}");
}

// ---------------------------------------------------------------------------------------------
// Finding 8: one address written several ways.

/// Before: the address was counted as written: `::ffff:198.51.100.7` and `198.51.100.7` had a
/// bucket each, and every IPv6 address (of the 2^64 of one /64) had its own. Now addresses are
/// counted in canonical form, IPv6 per /64 (`RATE_LIMIT__IPV6_PREFIX`).
async fn addresses_are_counted_in_their_canonical_form_and_per_ipv6_64(mode: Mode) {
    let mut settings = test_settings(mode);
    settings.rate_limit.login_per_ip = 4; // 2 at once
    let app = spawn_with(settings).await;
    let app = &app;
    let guess =
        |ip: &'static str| async move { app.login_from(&unique_email(), PASSWORD, ip).await };
    for ip in ["::ffff:198.51.100.7", "::FFFF:198.51.100.7"] {
        assert_code(guess(ip).await, Code::Unauthenticated);
    }
    assert_limited(guess("198.51.100.7").await);

    for ip in ["2001:db8:aa:bb::1", "2001:db8:aa:bb:ffff:ffff:ffff:ffff"] {
        assert_code(guess(ip).await, Code::Unauthenticated);
    }
    assert_limited(guess("2001:db8:aa:bb:1234::2").await);
    assert_limited(guess("2001:DB8:AA:BB::3").await);
    assert_code(guess("2001:db8:aa:bc::1").await, Code::Unauthenticated);
}

/// Before: requests without `client.ip_address` were not counted per address at all: 25
/// Registers without one all succeeded with `RATE_LIMIT__REGISTER_PER_IP=20`. Now they share one
/// bucket of their own (with or without a ClientInfo), which refuses them past the limit, while a
/// request with an address has its own.
async fn requests_without_an_address_share_one_bucket(mode: Mode) {
    let mut settings = test_settings(mode);
    settings.rate_limit.register_per_ip = 20;
    let app = spawn_with(settings).await;
    let (mut served, mut refused) = (0, 0);
    for i in 0..25 {
        let mut request = register_request(&unique_email());
        request.client = (i % 2 == 0).then(|| client("", ""));
        match app.auth.clone().register(request).await {
            Ok(_) => served += 1,
            other => {
                assert_limited(other);
                refused += 1;
            }
        }
    }
    assert!((1..=20).contains(&served), "{served} served");
    assert_eq!(served + refused, 25);
    let mut elsewhere = register_request(&unique_email());
    elsewhere.client = Some(client("192.0.2.55", ""));
    app.auth
        .clone()
        .register(elsewhere)
        .await
        .expect("an address has a bucket of its own");
}

// ---------------------------------------------------------------------------------------------
// Found attacking the hardening itself.

/// Before: an account trusted the owner's address per IPv6 /64 (as the address limit counts
/// it), so any neighbour in the owner's /64 shared the owner's own bucket: its guesses used the
/// owner's allowance up and locked the owner out. Now trust is for the exact address: the
/// neighbour is refused like any stranger, and the owner still gets in.
async fn a_trusted_address_is_that_address_not_its_network(mode: Mode) {
    let mut settings = test_settings(mode);
    settings.rate_limit.login_per_email = 4;
    settings.rate_limit.login_window = Duration::from_secs(3600);
    let app = spawn_with(settings).await;
    let (email, _) = app.register().await;
    let owner = || client("2001:db8:77:1::10", "");
    login_as(&app, &email, PASSWORD, owner()).await.unwrap();
    let neighbour = || client("2001:db8:77:1::99", "");
    let mut refused = false;
    for _ in 0..6 {
        match login_as(&app, &email, "guess", neighbour()).await {
            Err(status) if status.code() == Code::Unauthenticated => {}
            other => {
                assert_limited(other);
                refused = true;
                break;
            }
        }
    }
    assert!(refused, "the neighbour's guesses are limited");
    login_as(&app, &email, PASSWORD, owner())
        .await
        .expect("the owner's exact address is not locked out by its neighbour");
}

/// Before: ChangePassword paid only the account's guess bucket, which a correct current
/// password resets: a session holder could ask for two hashes per call in a loop. Now every
/// ChangePassword also pays the account's password-change bucket, right or wrong, never
/// refunded: the loop is refused (RESOURCE_EXHAUSTED with RetryInfo) within the limit.
async fn password_changes_pay_a_bucket_that_a_correct_password_does_not_refund(mode: Mode) {
    let mut settings = test_settings(mode);
    settings.rate_limit.login_per_email = 4;
    settings.rate_limit.login_window = Duration::from_secs(3600);
    let app = spawn_with(settings).await;
    let (_, reg) = app.register().await;
    let passwords = [PASSWORD, "another correct horse battery"];
    let (mut served, mut refused) = (0, 0);
    for i in 0..8 {
        let (current, new) = (passwords[i % 2], passwords[(i + 1) % 2]);
        match app.change_password(&reg.session_token, current, new).await {
            Ok(_) => served += 1,
            other => {
                assert_limited(other);
                refused += 1;
            }
        }
    }
    assert!((1..=4).contains(&served), "{served} changes served");
    assert_eq!(served + refused, 8);
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
    let closed_after = opened.elapsed();
    assert!(
        closed_after >= Duration::from_secs(4) && closed_after < Duration::from_secs(9),
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

/// Review found: one class of callers could take the whole PostgreSQL pool (a flood of
/// lookups left a user's Login waiting 1 s, then UNAVAILABLE). Now each class has its share
/// (`DATABASE__SHARES__*`): with every lookup connection stuck (a lock holds the profiles
/// table), Login still gets its own connections at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_one_class_leaves_the_others_their_share_of_the_pool() {
    let mut settings = test_settings(Mode::NoRedis);
    settings.local_cache.enabled = false;
    let app = std::sync::Arc::new(spawn_with(settings).await);
    let mut users = Vec::new();
    for _ in 0..12 {
        users.push(app.register().await.1.user_id);
    }
    let (email, _) = app.register().await;
    let lock = TableLock::hold(&app, "profiles").await;
    // More lookups than the pool has connections, each stuck on the lock.
    let flood: Vec<_> = users
        .iter()
        .map(|id| {
            let (app, id) = (app.clone(), id.clone());
            tokio::spawn(async move { app.get_profile(&id).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = std::time::Instant::now();
    app.login(&email, PASSWORD)
        .await
        .expect("a login while every lookup connection is taken");
    let took = started.elapsed();
    lock.release().await;
    for read in flood {
        let read = read.await.unwrap();
        assert!(
            read.is_ok() || read.as_ref().is_err_and(|s| s.code() == Code::Unavailable),
            "{read:?}"
        );
    }
    assert!(took < Duration::from_secs(1), "the login waited {took:?}");
    let shares = app.metrics().await;
    assert!(
        shares.contains("authd_db_connections{share=\"lookups\",state=\"in_use\"}"),
        "{shares}"
    );
}

/// Found while reviewing the budget of unknown lookups: a call cut short while its statement ran
/// (the caller's deadline, or the caller hanging up) never gave its connection back to sqlx's
/// pool, so six calls with a 100 ms `grpc-timeout` while PostgreSQL was slow (a lock) emptied the
/// lookups share for good — every lookup after was UNAVAILABLE. Calls now run to their end on a
/// task of their own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_cut_short_leave_the_pool_whole() {
    let mut settings = test_settings(Mode::NoRedis);
    settings.database.query_timeout = Duration::from_millis(300);
    let app = spawn_with(settings).await;
    let (_, registered) = app.register().await;
    let lock = TableLock::hold(&app, "sessions, profiles").await;
    for _ in 0..6 {
        let mut validate = tonic::Request::new(pb::ValidateSessionRequest {
            session_token: registered.session_token.clone(),
        });
        validate.set_timeout(Duration::from_millis(100));
        assert!(app.auth.clone().validate_session(validate).await.is_err());
        let mut read = tonic::Request::new(pb::GetProfileRequest {
            user_id: registered.user_id.clone(),
        });
        read.set_timeout(Duration::from_millis(100));
        assert!(app.profiles.clone().get_profile(read).await.is_err());
    }
    lock.release().await;
    crate::helpers::eventually(Duration::from_secs(5), "lookups answer again", || async {
        app.validate(&registered.session_token).await.is_ok()
    })
    .await;
    for _ in 0..10 {
        app.validate(&registered.session_token).await.unwrap();
        app.get_profile(&registered.user_id).await.unwrap();
    }
}
