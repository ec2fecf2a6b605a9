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

mod hashing;
mod lockouts;
mod pool;
mod redis;
mod requests;
mod transport;

// Helpers of the attack families.

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
