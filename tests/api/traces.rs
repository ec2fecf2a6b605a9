//! OpenTelemetry traces (docs/operations.md, "Traces"): the binary, given an OTLP endpoint,
//! exports each RPC as a server span in the caller's trace (`traceparent`), saying which tier
//! answered a lookup and how a revoking call's wait ended, and sends the spans still buffered
//! when it stops. The collector here is a small tonic server of OpenTelemetry's own trace
//! service (`opentelemetry-proto`).
use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use authd::proto::authd::v1::{self as pb, profile_service_client::ProfileServiceClient};
use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    },
    common::v1::{KeyValue, any_value::Value},
    trace::v1::{Span, span::SpanKind, status::StatusCode},
};
use secrecy::ExposeSecret;
use tonic::{Request, Response, Status};

use crate::binary::{self, Binary};

/// What the collector received: each span with its resource's `service.name`.
#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<(String, Span)>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let mut spans = self.spans.lock().unwrap();
        for resource in request.into_inner().resource_spans {
            let service = resource
                .resource
                .as_ref()
                .and_then(|r| text(&r.attributes, "service.name"))
                .unwrap_or_default();
            for scope in resource.scope_spans {
                spans.extend(scope.spans.into_iter().map(|s| (service.clone(), s)));
            }
        }
        Ok(Response::new(ExportTraceServiceResponse::default()))
    }
}

impl Collector {
    /// Serves on a free port; its address.
    async fn start(&self) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let service = TraceServiceServer::new(self.clone());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        format!("http://{addr}")
    }

    fn spans(&self) -> Vec<(String, Span)> {
        self.spans.lock().unwrap().clone()
    }

    /// The spans named `name`, once `count` of them arrived (panics after 15 s).
    async fn named(&self, name: &str, count: usize) -> Vec<Span> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        loop {
            let found: Vec<Span> = self
                .spans()
                .into_iter()
                .map(|(_, s)| s)
                .filter(|s| s.name == name)
                .collect();
            if found.len() >= count {
                return found;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{count} spans named {name} did not arrive; got {:?}",
                self.spans()
                    .iter()
                    .map(|(_, s)| s.name.clone())
                    .collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn text(attributes: &[KeyValue], key: &str) -> Option<String> {
    attributes.iter().find(|a| a.key == key).and_then(|a| {
        match a.value.as_ref()?.value.as_ref()? {
            Value::StringValue(s) => Some(s.clone()),
            _ => None,
        }
    })
}

/// The value of `key` on `span` or a span inside it (the call's own work).
fn told(spans: &[Span], span: &Span, key: &str) -> Option<String> {
    let mut within = vec![span.span_id.clone()];
    let mut grew = true;
    while grew {
        let before = within.len();
        for s in spans {
            if within.contains(&s.parent_span_id) && !within.contains(&s.span_id) {
                within.push(s.span_id.clone());
            }
        }
        grew = within.len() > before;
    }
    spans
        .iter()
        .filter(|s| within.contains(&s.span_id))
        .flat_map(|s| s.attributes.iter())
        .find(|a| a.key == key)
        .map(|a| format!("{:?}", a.value))
}

fn number(attributes: &[KeyValue], key: &str) -> Option<i64> {
    attributes.iter().find(|a| a.key == key).and_then(|a| {
        match a.value.as_ref()?.value.as_ref()? {
            Value::IntValue(n) => Some(*n),
            _ => None,
        }
    })
}

/// A caller's trace: its id, and the id of the caller's span each call is made under.
const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPANS: [&str; 6] = [
    "00f067aa0ba902b7",
    "00f067aa0ba902b8",
    "00f067aa0ba902b9",
    "00f067aa0ba902ba",
    "00f067aa0ba902bb",
    "00f067aa0ba902bc",
];

/// `message` sent under the caller's span `parent` of [`TRACE`].
fn traced<T>(message: T, parent: &str) -> Request<T> {
    let mut request = Request::new(message);
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{TRACE}-{parent}-01").parse().unwrap(),
    );
    request
}

/// Login, ValidateSession (three times), GetProfile (twice) and Logout under a caller's trace,
/// one Logout outside any: the spans arrive (only when the binary stops: its export interval
/// is a minute), each a server span of its method, in the caller's trace under the caller's
/// span, with the tier that answered and how the revocation's wait ended; a call without a
/// `traceparent` begins a trace of its own; and no span carries a token or a password.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_arrive_as_spans_of_the_callers_trace() {
    let collector = Collector::default();
    let endpoint = collector.start().await;
    let settings = crate::helpers::test_settings(crate::helpers::Mode::Redis);
    let mut cmd = binary::command(&settings, &crate::helpers::redis_url());
    let metrics: std::net::SocketAddr = format!("127.0.0.1:{}", binary::free_port())
        .parse()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys.toml");
    crate::admin::write_keys(&keys, &[("ops", crate::admin::KEY)]);
    cmd.env("TRACES__OTLP_ENDPOINT", &endpoint)
        .env("LOCAL_CACHE__ENABLED", "true")
        .env("ADMIN__API_KEYS_FILE", &keys)
        .env("METRICS__ADDR", metrics.to_string())
        // The RPC's line, and its span's fields (the method).
        .env("LOG__LEVEL", "warn,authd::rpc=info,authd::grpc=info")
        // Nothing leaves before the binary stops: the last spans are sent as it ends.
        .env("OTEL_BSP_SCHEDULE_DELAY", "60000");
    let binary = Binary::start(cmd).await;
    // Its memory serves once its lease is taken.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !binary::scrape_from(metrics, [127, 0, 0, 1])
        .await
        .contains("\nauthd_local_cache_lease_valid 1")
    {
        assert!(tokio::time::Instant::now() < deadline, "no lease");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut auth = binary.auth().await;
    let channel = binary.channel().await.expect("the binary serves");
    let mut profiles = ProfileServiceClient::new(channel.clone());
    let email = crate::helpers::unique_email();
    let registered = auth
        .register(crate::helpers::register_request(&email))
        .await
        .unwrap()
        .into_inner();
    let login = pb::LoginRequest {
        email: email.clone(),
        password: crate::helpers::PASSWORD.to_owned(),
        client: Some(pb::ClientInfo {
            ip_address: "203.0.113.7".to_owned(),
            ..Default::default()
        }),
    };
    let token = auth
        .login(traced(login, CALLER_SPANS[0]))
        .await
        .unwrap()
        .into_inner()
        .session_token;
    for _ in 0..3 {
        let validate = pb::ValidateSessionRequest {
            session_token: token.clone(),
            ..Default::default()
        };
        auth.validate_session(traced(validate, CALLER_SPANS[1]))
            .await
            .unwrap();
    }
    for _ in 0..2 {
        let get = pb::GetProfileRequest {
            user_id: registered.user_id.clone(),
        };
        profiles
            .get_profile(traced(get, CALLER_SPANS[2]))
            .await
            .unwrap();
    }
    let logout = pb::LogoutRequest {
        session_token: token.clone(),
    };
    auth.logout(traced(logout, CALLER_SPANS[3])).await.unwrap();
    auth.logout(pb::LogoutRequest {
        session_token: registered.session_token.clone(),
    })
    .await
    .unwrap();
    // A new password (a secret of its own), and an operator's call.
    let again = auth
        .login(pb::LoginRequest {
            email: email.clone(),
            password: crate::helpers::PASSWORD.to_owned(),
            client: None,
        })
        .await
        .unwrap()
        .into_inner()
        .session_token;
    let new_password = "violet kestrel over the harbour";
    let change = pb::ChangePasswordRequest {
        session_token: again.clone(),
        current_password: crate::helpers::PASSWORD.to_owned(),
        new_password: new_password.to_owned(),
    };
    auth.change_password(traced(change, CALLER_SPANS[4]))
        .await
        .unwrap();
    let mut admin =
        authd::proto::authd::v1::admin_service_client::AdminServiceClient::new(channel.clone());
    let mut disable = traced(
        pb::DisableUserRequest {
            user_id: registered.user_id.clone(),
            reason: "the traces test".to_owned(),
        },
        CALLER_SPANS[5],
    );
    disable.metadata_mut().insert(
        "authorization",
        format!("Bearer {}", crate::admin::KEY).parse().unwrap(),
    );
    admin.disable_user(disable).await.unwrap();
    // Probes are not traced.
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    health
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .unwrap();
    // Not one span has left yet.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(collector.spans().is_empty(), "exported before the stop");
    let log = binary
        .wait_for_line(&["ValidateSession", "trace_id"], Duration::from_secs(5))
        .await;
    assert!(
        log.contains(TRACE),
        "the RPC's log line names its trace: {log}"
    );
    binary.signal(libc::SIGTERM);

    let caller = hex::decode(TRACE).unwrap();
    let login: Vec<Span> = collector
        .named("authd.v1.AuthService/Login", 2)
        .await
        .into_iter()
        .filter(|s| s.trace_id == caller)
        .collect();
    let [login] = &login[..] else {
        panic!("one Login span: {login:?}")
    };
    assert_eq!(login.trace_id, caller, "in the caller's trace");
    assert_eq!(login.parent_span_id, hex::decode(CALLER_SPANS[0]).unwrap());
    assert_eq!(login.kind, SpanKind::Server as i32);
    assert_eq!(
        text(&login.attributes, "rpc.system").as_deref(),
        Some("grpc")
    );
    assert_eq!(
        text(&login.attributes, "rpc.service").as_deref(),
        Some("authd.v1.AuthService")
    );
    assert_eq!(
        text(&login.attributes, "rpc.method").as_deref(),
        Some("Login")
    );
    assert_eq!(number(&login.attributes, "rpc.grpc.status_code"), Some(0));
    // The work inside the call (authd's own spans) hangs below the call's span.
    let inside: Vec<_> = collector
        .spans()
        .into_iter()
        .map(|(_, s)| s)
        .filter(|s| s.parent_span_id == login.span_id)
        .collect();
    assert!(!inside.is_empty(), "no span inside the Login");
    assert!(inside.iter().all(|s| s.trace_id == caller));

    let validations = collector
        .named("authd.v1.AuthService/ValidateSession", 3)
        .await;
    let mut tiers: Vec<String> = validations
        .iter()
        .map(|s| {
            assert_eq!(s.trace_id, caller);
            assert_eq!(s.parent_span_id, hex::decode(CALLER_SPANS[1]).unwrap());
            text(&s.attributes, "authd.tier").expect("a validation names its tier")
        })
        .collect();
    tiers.sort();
    // The first from Redis (Login filled it), then from this instance's memory.
    assert_eq!(tiers, ["memory", "memory", "redis"]);

    let reads = collector
        .named("authd.v1.ProfileService/GetProfile", 2)
        .await;
    let mut tiers: Vec<String> = reads
        .iter()
        .map(|s| text(&s.attributes, "authd.tier").expect("a read names its tier"))
        .collect();
    tiers.sort();
    // Nothing had read the profile: PostgreSQL, then memory.
    assert_eq!(tiers, ["memory", "postgresql"]);

    let logouts = collector.named("authd.v1.AuthService/Logout", 2).await;
    let (ours, theirs): (Vec<_>, Vec<_>) = logouts.iter().partition(|s| s.trace_id == caller);
    let [ours] = &ours[..] else {
        panic!("one Logout in the caller's trace: {logouts:?}")
    };
    assert_eq!(ours.parent_span_id, hex::decode(CALLER_SPANS[3]).unwrap());
    let spans: Vec<Span> = collector.spans().into_iter().map(|(_, s)| s).collect();
    let wait = told(&spans, ours, "authd.revocation.wait").expect("the revocation's wait is told");
    // No other instance held a copy.
    assert!(wait.contains("\"none\""), "{wait}");
    let [theirs] = &theirs[..] else {
        panic!("one Logout outside the caller's trace: {logouts:?}")
    };
    assert!(theirs.parent_span_id.is_empty(), "a trace begun here");
    assert_eq!(theirs.trace_id.len(), 16);
    assert_eq!(
        theirs.status.as_ref().map_or(0, |s| s.code),
        StatusCode::Unset as i32
    );

    // An operator's call: its work (run on a task of its own) in the caller's trace, under
    // the call, its revocation's wait told there.
    let disable = collector
        .named("authd.v1.AdminService/DisableUser", 1)
        .await;
    let disable = &disable[0];
    assert_eq!(disable.trace_id, caller);
    assert_eq!(
        disable.parent_span_id,
        hex::decode(CALLER_SPANS[5]).unwrap()
    );
    let spans: Vec<Span> = collector.spans().into_iter().map(|(_, s)| s).collect();
    assert!(
        told(&spans, disable, "authd.revocation.wait").is_some(),
        "the wait of DisableUser is told in its trace"
    );
    assert!(
        spans
            .iter()
            .filter(|s| s.name == "disable_user")
            .all(|s| s.trace_id == caller),
        "the operator's work left the caller's trace"
    );
    let change = collector
        .named("authd.v1.AuthService/ChangePassword", 1)
        .await;
    assert!(told(&spans, &change[0], "authd.revocation.wait").is_some());
    assert!(
        spans.iter().all(|s| !s.name.starts_with("grpc.health")),
        "a probe was traced"
    );

    let everything = collector.spans();
    assert!(everything.iter().all(|(service, _)| service == "authd"));
    let dump = format!("{everything:?}");
    for secret in [
        token.as_str(),
        registered.session_token.as_str(),
        again.as_str(),
        crate::helpers::PASSWORD,
        new_password,
        crate::admin::KEY,
    ] {
        assert!(!dump.contains(secret), "a secret in a span");
    }
    drop(binary);
    crate::helpers::drop_database(settings.database.url.expose_secret()).await;
}

/// A call the server fails (an unknown method answers UNIMPLEMENTED) is an error span, named
/// `unknown`; a caller's mistake (an unknown token: UNAUTHENTICATED) is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_servers_failures_are_error_spans() {
    let collector = Collector::default();
    let endpoint = collector.start().await;
    let settings = crate::helpers::test_settings(crate::helpers::Mode::NoRedis);
    let mut cmd = binary::command(&settings, "redis://127.0.0.1:1");
    cmd.env("REDIS__ENABLED", "false")
        .env("TRACES__OTLP_ENDPOINT", &endpoint)
        .env("OTEL_BSP_SCHEDULE_DELAY", "50");
    let binary = Binary::start(cmd).await;
    let mut auth = binary.auth().await;
    let refused = auth
        .validate_session(pb::ValidateSessionRequest {
            session_token: "not a token".to_owned(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);
    let channel = binary.channel().await.expect("the binary serves");
    let mut client = tonic::client::Grpc::new(channel);
    client.ready().await.unwrap();
    let unknown: Result<Response<()>, Status> = client
        .unary(
            Request::new(()),
            "/authd.v1.AuthService/NoSuchMethod".parse().unwrap(),
            tonic_prost::ProstCodec::<(), ()>::default(),
        )
        .await;
    assert_eq!(unknown.unwrap_err().code(), tonic::Code::Unimplemented);
    let validation = collector
        .named("authd.v1.AuthService/ValidateSession", 1)
        .await;
    assert_eq!(
        number(&validation[0].attributes, "rpc.grpc.status_code"),
        Some(tonic::Code::Unauthenticated as i64)
    );
    assert_eq!(
        validation[0].status.as_ref().map_or(0, |s| s.code),
        StatusCode::Unset as i32
    );
    // Named like the metrics' label: a caller's made-up path is not a span name, nor an
    // attribute of OpenTelemetry's.
    let unknown = collector.named("unknown", 1).await;
    assert_eq!(text(&unknown[0].attributes, "rpc.method"), None);
    assert_eq!(
        unknown[0].status.as_ref().map_or(0, |s| s.code),
        StatusCode::Error as i32
    );
    drop(binary);
    crate::helpers::drop_database(settings.database.url.expose_secret()).await;
}
