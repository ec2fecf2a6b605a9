//! `authd.v1.ProfileService` over gRPC.
use std::sync::Arc;

use tonic::{Request, Response, Status};
use uuid::Uuid;

use super::timestamp;
use crate::{
    auth::input::{self, Violations},
    profile::{self, ProfileChanges, ProfileError, ProfileRecord, ProfileService},
    proto::authd::v1::{self as pb, profile_service_server::ProfileService as ProfileServiceRpc},
};

pub use crate::proto::authd::v1::profile_service_server::ProfileServiceServer;

/// BatchGetProfiles accepts at most this many ids.
pub const BATCH_MAX: usize = 100;

/// The fields UpdateProfile may change.
const UPDATABLE: [&str; 5] = ["display_name", "bio", "avatar_url", "locale", "time_zone"];
/// A mask names at most this many paths (each updatable field, with room for repeats).
const MAX_PATHS: usize = 10;

pub struct ProfileGrpc {
    service: Arc<ProfileService>,
}

impl ProfileGrpc {
    pub fn new(service: Arc<ProfileService>) -> Self {
        Self { service }
    }
}

impl From<ProfileRecord> for pb::Profile {
    fn from(p: ProfileRecord) -> Self {
        pb::Profile {
            user_id: p.user_id.to_string(),
            display_name: p.display_name,
            bio: p.bio,
            avatar_url: p.avatar_url,
            locale: p.locale,
            time_zone: p.time_zone,
            version: p.version,
            created_at: Some(timestamp(p.created_at)),
            updated_at: Some(timestamp(p.updated_at)),
            email_verified: p.email_verified_at.is_some(),
            email_verified_at: p.email_verified_at.map(timestamp),
        }
    }
}

fn invalid(violations: Vec<input::FieldViolation>) -> ProfileError {
    ProfileError::InvalidInput(violations)
}

fn authd_token_malformed(token: &str) -> bool {
    crate::auth::token::TokenHash::of_token(token).is_none()
}

/// The ids in the order given, each once.
fn parse_ids(raw: &[String]) -> Result<Vec<Uuid>, ProfileError> {
    let mut v = Violations::default();
    if raw.is_empty() || raw.len() > BATCH_MAX {
        v.check::<()>(
            "user_ids",
            Err(format!("must hold 1 to {BATCH_MAX} ids, not {}", raw.len())),
        );
        return Err(invalid(v.finish(|| None::<()>).unwrap_err()));
    }
    let mut ids = Vec::with_capacity(raw.len());
    for (i, id) in raw.iter().enumerate() {
        if let Some(id) = v.check(&format!("user_ids[{i}]"), input::uuid(id))
            && !ids.contains(&id)
        {
            ids.push(id);
        }
    }
    v.finish(|| Some(ids)).map_err(invalid)
}

/// The mask's fields, validated, as changes.
fn parse_update(
    req: &pb::UpdateProfileRequest,
) -> Result<(ProfileChanges, Option<i64>), ProfileError> {
    let mut v = Violations::default();
    let paths = req
        .update_mask
        .as_ref()
        .map(|m| m.paths.as_slice())
        .unwrap_or_default();
    if paths.is_empty() || paths.len() > MAX_PATHS {
        v.check::<()>(
            "update_mask",
            Err(format!(
                "must name 1 to {MAX_PATHS} of {}",
                UPDATABLE.join(", ")
            )),
        );
        return Err(invalid(v.finish(|| None::<()>).unwrap_err()));
    }
    if let Some(path) = paths.iter().find(|p| !UPDATABLE.contains(&p.as_str())) {
        let shown: String = path.chars().take(64).collect();
        v.check::<()>(
            "update_mask",
            Err(format!(
                "{shown:?} cannot be updated; use {}",
                UPDATABLE.join(", ")
            )),
        );
    }
    let given = req.profile.clone().unwrap_or_default();
    let named = |field: &str| paths.iter().any(|p| p == field);
    let mut changes = ProfileChanges::default();
    if named("display_name") {
        changes.display_name = v.check(
            "profile.display_name",
            input::display_name(&given.display_name),
        );
    }
    if named("bio") {
        changes.bio = v.check("profile.bio", profile::model::bio(&given.bio));
    }
    if named("avatar_url") {
        changes.avatar_url = v.check(
            "profile.avatar_url",
            profile::model::avatar_url(&given.avatar_url),
        );
    }
    if named("locale") {
        changes.locale = v.check("profile.locale", profile::model::locale(&given.locale));
    }
    if named("time_zone") {
        changes.time_zone = v.check(
            "profile.time_zone",
            profile::model::time_zone(&given.time_zone),
        );
    }
    let expected = match req.expected_version {
        0 => None,
        n if n > 0 => Some(n),
        _ => v.check(
            "expected_version",
            Err("must be 0 (no check) or a version".into()),
        ),
    };
    v.finish(|| Some((changes, expected))).map_err(invalid)
}

#[tonic::async_trait]
impl ProfileServiceRpc for ProfileGrpc {
    async fn get_profile(
        &self,
        request: Request<pb::GetProfileRequest>,
    ) -> Result<Response<pb::GetProfileResponse>, Status> {
        let mut v = Violations::default();
        let id = v.check("user_id", input::uuid(&request.get_ref().user_id));
        let id = v.finish(|| id).map_err(invalid)?;
        let profile = self.service.get(id).await?;
        Ok(Response::new(pb::GetProfileResponse {
            profile: Some(profile.into()),
        }))
    }

    async fn batch_get_profiles(
        &self,
        request: Request<pb::BatchGetProfilesRequest>,
    ) -> Result<Response<pb::BatchGetProfilesResponse>, Status> {
        let ids = parse_ids(&request.get_ref().user_ids)?;
        let batch = self.service.batch_get(&ids).await?;
        Ok(Response::new(pb::BatchGetProfilesResponse {
            profiles: batch.profiles.into_iter().map(Into::into).collect(),
            not_found_user_ids: batch.not_found.iter().map(Uuid::to_string).collect(),
        }))
    }

    async fn update_profile(
        &self,
        request: Request<pb::UpdateProfileRequest>,
    ) -> Result<Response<pb::UpdateProfileResponse>, Status> {
        let req = request.get_ref();
        let token =
            super::session_token(&request, &req.session_token).map_err(ProfileError::Auth)?;
        // The cheapest check first: a token that cannot be one costs nothing more.
        if authd_token_malformed(token) {
            return Err(ProfileError::Auth(crate::auth::AuthError::InvalidSession).into());
        }
        let (changes, expected) = parse_update(req)?;
        let profile = self.service.update(token, changes, expected).await?;
        Ok(Response::new(pb::UpdateProfileResponse {
            profile: Some(profile.into()),
        }))
    }
}
