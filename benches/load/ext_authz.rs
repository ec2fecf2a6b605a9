//! Envoy's external authorization (`envoy.service.auth.v3.Authorization/Check`) on an instance
//! with the in-process cache: warm checks against the same instance's Health/Check, and warm
//! checks while a login storm hashes passwords on it.
use std::{collections::HashMap, sync::Arc};

use envoy_types::pb::envoy::service::auth::v3::{
    AttributeContext, CheckRequest, attribute_context,
};
use tonic::{Code, transport::Channel};

use crate::{
    driver::{self, Load, Pace},
    report::{Row, Target},
    scenarios::{health_call, measure, measure_during_login_storm},
    setup::{Env, Server},
    subscribers::median_round,
};

pub const SCENARIOS: [&str; 3] = [
    "ext_authz_health_check",
    "ext_authz_check",
    "ext_authz_during_login_storm",
];

/// A CheckRequest as Envoy sends one for a browser's GET: a dozen headers, the token in
/// `authorization`.
fn check_request(token: &str) -> CheckRequest {
    let headers: HashMap<String, String> = [
        (":authority", "shop.example"),
        (":method", "GET"),
        (":path", "/orders?page=2"),
        (":scheme", "https"),
        (
            "accept",
            "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8",
        ),
        ("accept-encoding", "gzip, deflate, br"),
        ("accept-language", "en-GB,en;q=0.9"),
        (
            "user-agent",
            "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 Chrome/131.0 Safari/537.36",
        ),
        ("x-forwarded-proto", "https"),
        ("x-request-id", "9b2c1f0e-5d1e-4c3b-9a8f-2e7d6c5b4a39"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .chain([("authorization".to_owned(), format!("Bearer {token}"))])
    .collect();
    CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(attribute_context::Request {
                http: Some(attribute_context::HttpRequest {
                    method: "GET".into(),
                    path: "/orders?page=2".into(),
                    host: "shop.example".into(),
                    headers,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
    }
}

/// A CheckRequest encoded once: the generator sends its bytes as they are. Envoy's encoding is
/// Envoy's work, and on this machine the generator shares the cores with the server: building
/// and encoding a dozen headers per call would be counted against authd.
#[derive(Clone, Debug, Default)]
struct Encoded(prost::bytes::Bytes);

impl prost::Message for Encoded {
    fn encode_raw(&self, buf: &mut impl prost::bytes::BufMut) {
        buf.put_slice(&self.0);
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: prost::encoding::WireType,
        buf: &mut impl prost::bytes::Buf,
        ctx: prost::encoding::DecodeContext,
    ) -> Result<(), prost::DecodeError> {
        prost::encoding::skip_field(wire_type, tag, buf, ctx)
    }

    fn encoded_len(&self) -> usize {
        self.0.len()
    }

    fn clear(&mut self) {
        self.0.clear();
    }
}

/// Of a CheckResponse, what the generator reads: the status (the rest is skipped unread).
#[derive(Clone, PartialEq, prost::Message)]
struct Answer {
    #[prost(message, optional, tag = "1")]
    status: Option<AnswerStatus>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct AnswerStatus {
    #[prost(int32, tag = "1")]
    code: i32,
}

/// A Check of each user's token in turn, which must be allowed.
fn check_call(tokens: Arc<Vec<String>>) -> impl driver::Call {
    use prost::Message;
    let requests: Arc<Vec<Encoded>> = Arc::new(
        tokens
            .iter()
            .map(|t| Encoded(check_request(t).encode_to_vec().into()))
            .collect(),
    );
    move |ch: Channel, seq| {
        let request = requests[seq as usize % requests.len()].clone();
        async move {
            let mut grpc = tonic::client::Grpc::new(ch);
            grpc.ready()
                .await
                .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
            let path =
                http::uri::PathAndQuery::from_static("/envoy.service.auth.v3.Authorization/Check");
            let codec = tonic_prost::ProstCodec::<Encoded, Answer>::default();
            let response = grpc
                .unary(tonic::Request::new(request), path, codec)
                .await?;
            match response.into_inner().status.map_or(0, |s| s.code) {
                0 => Ok(()),
                code => Err(tonic::Status::new(Code::from(code), "denied")),
            }
        }
    }
}

/// The three scenarios on `server` (an instance with the in-process cache, warm).
pub async fn run(
    env: &Env,
    server: &Server,
    load: Load,
    rounds: usize,
    wants: impl Fn(&str) -> bool,
) -> anyhow::Result<Vec<Row>> {
    let tokens: Arc<Vec<String>> = Arc::new(env.users.iter().map(|u| u.token.clone()).collect());
    let mut rows = Vec::new();
    let closed = Pace::Closed;
    if wants("ext_authz_health_check") || wants("ext_authz_check") {
        // Alternating rounds, each side's median kept: this machine's rate moves by a quarter
        // from one minute to the next.
        let (mut health, mut check) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            let call = health_call();
            let (row, _) = measure(
                env,
                server,
                "ext_authz_health_check",
                load,
                closed,
                &[],
                call,
            )
            .await?;
            health.push(row);
            let call = check_call(tokens.clone());
            let (row, _) = measure(env, server, "ext_authz_check", load, closed, &[], call).await?;
            check.push(row);
        }
        let (health, mut check) = (median_round(health), median_round(check));
        check.note = format!(
            "vs this instance's Health/Check {:.0} req/s; {}",
            health.requests_per_s, check.note
        );
        rows.extend([health, check]);
    }
    if wants("ext_authz_during_login_storm") {
        // Five times the hashing the instance can do: most logins are refused
        // (RESOURCE_EXHAUSTED), the hashing pool is full.
        let storm_rate = 5.0 * 40.0 * server.settings.auth.hash_concurrency as f64;
        let name = "ext_authz_during_login_storm";
        let call = check_call(tokens);
        let (row, _) =
            measure_during_login_storm(env, server, name, load, storm_rate, call).await?;
        rows.push(row);
    }
    Ok(rows)
}

/// The issue's targets.
pub fn targets(rows: &[Row], out: &mut Vec<Target>) {
    let row = |name: &str| rows.iter().find(|r| r.scenario == name);
    if let (Some(r), Some(health)) = (row("ext_authz_check"), row("ext_authz_health_check")) {
        let ratio = r.requests_per_s / health.requests_per_s.max(1.0);
        out.push(Target {
            target: "ext_authz_check (warm, in-process cache) >= 90% of the same instance's \
                     Health/Check"
                .into(),
            met: ratio >= 0.9,
            measured: format!("{:.0}%", ratio * 100.0),
        });
        out.push(Target {
            target: "ext_authz_check: 0 PostgreSQL queries and 0 Redis commands per request".into(),
            met: r.pg_queries_per_request < 0.005 && r.redis_commands_per_request < 0.005,
            measured: format!(
                "{:.3} / {:.4}",
                r.pg_queries_per_request, r.redis_commands_per_request
            ),
        });
    }
    if let Some(r) = row("ext_authz_during_login_storm") {
        out.push(Target {
            target:
                "ext_authz_during_login_storm: p99 <= 50 ms (Envoy's default timeout is 200 ms)"
                    .into(),
            met: r.p99_ms <= 50.0,
            measured: format!("{:.2} ms (p50 {:.2} ms)", r.p99_ms, r.p50_ms),
        });
    }
}
