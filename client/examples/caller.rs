//! A caller service behind `AuthLayer`: every call to `example.v1.WhoAmIService` needs
//! `authorization: Bearer <authd session token>`, validated in this process' memory when it
//! may be (strict mode: a token whose Logout returned is refused at once).
//!
//! ```sh
//! # authd, with a subscriber key (README "EventService")
//! EVENTS__API_KEYS_FILE=subscribers.toml cargo run --release -- serve &
//! AUTHD_SUBSCRIBER_KEY=... cargo run -p authd-client --example caller
//! grpcurl -plaintext -import-path client/examples/proto -proto whoami.proto \
//!   -H "authorization: Bearer $TOKEN" localhost:50061 example.v1.WhoAmIService/WhoAmI
//! ```
//!
//! Settings (environment): `AUTHD_ADDR` (default `http://127.0.0.1:50051`),
//! `AUTHD_SUBSCRIBER_KEY`, `LISTEN` (default `127.0.0.1:50061`), `MODE` (`strict`, the default,
//! or `bounded`), `CHECK` (`off` serves without the layer, for comparison).
use authd_client::{AuthLayer, Authenticated, Config, Mode, Validator};
use tonic::{Request, Response, Status, transport::Server};

mod whoami {
    tonic::include_proto!("example.v1");
}
use whoami::{
    WhoAmIRequest, WhoAmIResponse,
    who_am_i_service_server::{WhoAmIService, WhoAmIServiceServer},
};

struct WhoAmI {
    validator: Validator,
}

#[tonic::async_trait]
impl WhoAmIService for WhoAmI {
    async fn who_am_i(
        &self,
        request: Request<WhoAmIRequest>,
    ) -> Result<Response<WhoAmIResponse>, Status> {
        let Some(Authenticated(session)) = request.extensions().get::<Authenticated>() else {
            // Served with CHECK=off.
            return Ok(Response::new(WhoAmIResponse::default()));
        };
        Ok(Response::new(WhoAmIResponse {
            user_id: session.user_id.clone(),
            session_id: session.session_id.clone(),
            memory_trusted: self.validator.trusted(),
        }))
    }
}

fn env(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .init();
    let authd =
        tonic::transport::Endpoint::from_shared(env("AUTHD_ADDR", "http://127.0.0.1:50051"))?
            .connect_lazy();
    let mode = match env("MODE", "strict").as_str() {
        "bounded" => Mode::Bounded,
        _ => Mode::Strict,
    };
    let validator = Validator::new(
        authd,
        Config {
            mode,
            api_key: std::env::var("AUTHD_SUBSCRIBER_KEY").ok(),
            ..Config::default()
        },
    );
    let listen = env("LISTEN", "127.0.0.1:50061").parse()?;
    let service = WhoAmIServiceServer::new(WhoAmI {
        validator: validator.clone(),
    });
    println!("caller listening on {listen} ({mode:?})");
    if env("CHECK", "on") == "off" {
        Server::builder().add_service(service).serve(listen).await?;
    } else {
        Server::builder()
            .layer(AuthLayer::new(validator))
            .add_service(service)
            .serve(listen)
            .await?;
    }
    Ok(())
}
