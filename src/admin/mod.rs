//! AdminService: operators acting on an account without its user's token. Who may call it
//! (`access`), the page tokens of its listings (`page_token`), and the audit of every call.
//! The actions themselves are `AuthService`'s (see `auth::admin`): one path for every
//! revocation.
pub mod access;
pub mod page_token;

use std::sync::Arc;

use tokio::sync::OnceCell;

use crate::{
    auth::AuthService,
    metrics::Metrics,
    store::{AuditEntry, Db, StoreError},
};
pub use access::{Access, Admission};
pub use page_token::PageTokens;

/// The name of the page-token key in `service_secrets`.
const PAGE_TOKEN_SECRET: &str = "admin_page_token";

pub struct AdminService {
    pub auth: Arc<AuthService>,
    pub access: Access,
    db: Arc<Db>,
    metrics: Arc<Metrics>,
    tokens: OnceCell<PageTokens>,
}

impl AdminService {
    pub fn new(auth: Arc<AuthService>, access: Access, db: Arc<Db>, metrics: Arc<Metrics>) -> Self {
        Self {
            auth,
            access,
            db,
            metrics,
            tokens: OnceCell::new(),
        }
    }

    /// The page-token signer, with the key every instance shares (made by the first that needs
    /// it).
    pub async fn page_tokens(&self) -> Result<&PageTokens, StoreError> {
        self.tokens
            .get_or_try_init(|| async {
                let mut fresh = [0u8; 32];
                getrandom::fill(&mut fresh)
                    .expect("the operating system's random number generator failed");
                let key = self.db.admin().secret(PAGE_TOKEN_SECRET, &fresh).await?;
                Ok(PageTokens::new(key))
            })
            .await
    }

    /// Records one call: a row in `admin_audit`, a log line and the metric. A row that cannot be
    /// written is logged as an error (the log line has everything the row would have).
    pub async fn audit(&self, entry: AuditEntry<'_>) {
        self.metrics
            .admin_calls
            .with_label_values(&[entry.method, entry.outcome])
            .inc();
        tracing::info!(
            target: "authd::audit",
            caller = entry.caller,
            method = entry.method,
            target_user = entry.target,
            outcome = entry.outcome,
            request_id = entry.request_id,
            "admin call"
        );
        if let Err(error) = self.db.admin().audit(&entry).await {
            tracing::error!(%error, method = entry.method, "the admin audit row could not be written");
        }
    }
}
