//! More of what a test does with a running authd: health watches, metrics, profile and session
//! calls.

use super::*;

impl TestApp {
    /// A health Watch stream on `service`, after its first answer (asserted SERVING).
    pub async fn watch_serving(
        &self,
        service: &str,
    ) -> tonic::Streaming<tonic_health::pb::HealthCheckResponse> {
        use futures::StreamExt;
        use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};
        let mut watch = self
            .health
            .clone()
            .watch(HealthCheckRequest {
                service: service.to_owned(),
            })
            .await
            .unwrap()
            .into_inner();
        let first = watch.next().await.unwrap().unwrap();
        assert_eq!(first.status(), ServingStatus::Serving, "{service:?}");
        watch
    }

    /// The Prometheus text from `/metrics`.
    pub async fn metrics(&self) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let addr = self.metrics_addr.expect("metrics are enabled");
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(b"GET /metrics HTTP/1.0\r\nHost: authd\r\n\r\n")
            .await
            .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
        assert!(
            head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"),
            "{head}"
        );
        body.to_owned()
    }

    /// The value of one sample (`name{labels}`) in `/metrics`, 0 when absent.
    pub async fn metric(&self, sample: &str) -> f64 {
        self.metrics()
            .await
            .lines()
            .find_map(|l| {
                l.strip_prefix(sample)?
                    .strip_prefix(' ')?
                    .trim()
                    .parse()
                    .ok()
            })
            .unwrap_or(0.0)
    }

    pub async fn get_profile(&self, user_id: &str) -> Result<pb::Profile, Status> {
        self.profiles
            .clone()
            .get_profile(pb::GetProfileRequest {
                user_id: user_id.to_owned(),
            })
            .await
            .map(|r| r.into_inner().profile.expect("a profile"))
    }

    pub async fn batch_get(&self, ids: &[String]) -> Result<pb::BatchGetProfilesResponse, Status> {
        self.profiles
            .clone()
            .batch_get_profiles(pb::BatchGetProfilesRequest {
                user_ids: ids.to_vec(),
            })
            .await
            .map(|r| r.into_inner())
    }

    /// Updates the named fields to the values in `profile`.
    pub async fn update_profile(
        &self,
        token: &str,
        profile: pb::Profile,
        paths: &[&str],
        expected_version: i64,
    ) -> Result<pb::Profile, Status> {
        self.profiles
            .clone()
            .update_profile(pb::UpdateProfileRequest {
                session_token: token.to_owned(),
                profile: Some(profile),
                update_mask: Some(prost_types::FieldMask {
                    paths: paths.iter().map(|p| (*p).to_owned()).collect(),
                }),
                expected_version,
            })
            .await
            .map(|r| r.into_inner().profile.expect("a profile"))
    }

    pub async fn list_sessions(&self, token: &str) -> Result<pb::ListSessionsResponse, Status> {
        self.auth
            .clone()
            .list_sessions(pb::ListSessionsRequest {
                session_token: token.to_owned(),
            })
            .await
            .map(|r| r.into_inner())
    }

    pub async fn revoke_session(&self, token: &str, session_id: &str) -> Result<(), Status> {
        self.auth
            .clone()
            .revoke_session(pb::RevokeSessionRequest {
                session_token: token.to_owned(),
                session_id: session_id.to_owned(),
            })
            .await
            .map(|_| ())
    }

    pub async fn revoke_all(&self, token: &str, include_current: bool) -> Result<i32, Status> {
        self.auth
            .clone()
            .revoke_all_sessions(pb::RevokeAllSessionsRequest {
                session_token: token.to_owned(),
                include_current,
            })
            .await
            .map(|r| r.into_inner().revoked_count)
    }

    pub async fn change_password(
        &self,
        token: &str,
        current: &str,
        new: &str,
    ) -> Result<i32, Status> {
        self.auth
            .clone()
            .change_password(pb::ChangePasswordRequest {
                session_token: token.to_owned(),
                current_password: current.to_owned(),
                new_password: new.to_owned(),
            })
            .await
            .map(|r| r.into_inner().revoked_count)
    }

    /// The full ValidateSession answer (with `authenticated_at`).
    pub async fn validate_full(&self, token: &str) -> Result<pb::ValidateSessionResponse, Status> {
        self.auth
            .clone()
            .validate_session(pb::ValidateSessionRequest {
                session_token: token.to_owned(),
                ..Default::default()
            })
            .await
            .map(|r| r.into_inner())
    }

    pub async fn login_from(
        &self,
        email: &str,
        password: &str,
        ip: &str,
    ) -> Result<pb::LoginResponse, Status> {
        self.auth
            .clone()
            .login(pb::LoginRequest {
                email: email.to_owned(),
                password: password.to_owned(),
                client: Some(pb::ClientInfo {
                    ip_address: ip.to_owned(),
                    ..pb::ClientInfo::default()
                }),
            })
            .await
            .map(|r| r.into_inner())
    }
}
