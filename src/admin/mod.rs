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
    /// Calls in progress (action and audit): shutdown waits for them.
    pub tasks: tokio_util::task::TaskTracker,
    /// Row budgets of refused calls: UNAUTHENTICATED ones, and PERMISSION_DENIED ones (a
    /// flood of anonymous calls cannot hide a known caller that was denied).
    refused_rows: std::sync::Mutex<[RowBudget; 2]>,
    /// Refusals over the row budget since the last flush, by (caller, method, outcome).
    suppressed: std::sync::Mutex<std::collections::HashMap<(String, String, String), u64>>,
}

impl AdminService {
    pub fn new(auth: Arc<AuthService>, access: Access, db: Arc<Db>, metrics: Arc<Metrics>) -> Self {
        Self {
            auth,
            access,
            db,
            metrics,
            tokens: OnceCell::new(),
            tasks: tokio_util::task::TaskTracker::new(),
            refused_rows: std::sync::Mutex::new(std::array::from_fn(|_| RowBudget {
                tokens: REFUSED_ROWS_PER_SECOND * 2.0,
                at: std::time::Instant::now(),
            })),
            suppressed: std::sync::Mutex::default(),
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

    /// Records one call: the metric and a log line always; a row in `admin_audit` for every
    /// admitted call, and for refused ones up to [`REFUSED_ROWS_PER_SECOND`] each of
    /// UNAUTHENTICATED and PERMISSION_DENIED (beyond that they are summed up, per caller, method
    /// and outcome, into one row per [`AdminService::flush_refused`]):
    /// unauthenticated callers cannot turn the audit into a write flood. A row that cannot be
    /// written is logged as an error (the log line has everything the row would have).
    pub async fn audit(&self, entry: AuditEntry<'_>, admitted: bool) {
        // What the caller sent is stored so that PostgreSQL can hold it (no NUL) and a terminal
        // showing it cannot be driven by it: control characters escaped, and the backslash.
        let (caller, target, request_id) = (
            printable(entry.caller),
            printable(entry.target),
            printable(entry.request_id),
        );
        let entry = AuditEntry {
            caller: &caller,
            target: &target,
            request_id: &request_id,
            ..entry
        };
        self.metrics
            .admin_calls
            .with_label_values(&[entry.method, entry.outcome])
            .inc();
        crate::auth::security::admin_action(
            entry.caller,
            entry.method,
            entry.target,
            entry.outcome,
            entry.request_id,
        );
        let budget = usize::from(entry.outcome != "Unauthenticated");
        if !admitted && !self.refused_rows.lock().unwrap_or_else(|e| e.into_inner())[budget].take()
        {
            self.suppress(entry.caller, entry.method, entry.outcome, 1);
            return;
        }
        // PostgreSQL that is briefly away (a failover, a pool that timed out under the very
        // outage the call met) does not lose the row: it is written again until
        // [`AUDIT_RETRY`] has passed (at least once: a write whose reply was lost may be
        // written twice).
        let started = std::time::Instant::now();
        let mut pause = std::time::Duration::from_millis(50);
        loop {
            match self.db.admin().audit(&entry).await {
                Ok(()) => return,
                Err(StoreError::Unavailable(_) | StoreError::Contention(_))
                    if started.elapsed() + pause < AUDIT_RETRY =>
                {
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(std::time::Duration::from_millis(500));
                }
                Err(error) => {
                    tracing::error!(%error, method = entry.method, "the admin audit row could not be written");
                    return;
                }
            }
        }
    }

    fn suppress(&self, caller: &str, method: &str, outcome: &str, count: u64) {
        let mut suppressed = self.suppressed.lock().unwrap_or_else(|e| e.into_inner());
        *suppressed
            .entry((caller.to_owned(), method.to_owned(), outcome.to_owned()))
            .or_default() += count;
    }

    /// Writes the refusals summed up since the last flush, one row per caller, method and
    /// outcome (request id [`SUMMED_UP`]). What cannot be written is kept for the next flush.
    pub async fn flush_refused(&self) {
        let pending: Vec<((String, String, String), u64)> =
            std::mem::take(&mut *self.suppressed.lock().unwrap_or_else(|e| e.into_inner()))
                .into_iter()
                .collect();
        for ((caller, method, outcome), count) in pending {
            let entry = AuditEntry {
                caller: &caller,
                method: &method,
                target: "",
                outcome: &outcome,
                request_id: SUMMED_UP,
                count: i32::try_from(count).unwrap_or(i32::MAX),
            };
            if let Err(error) = self.db.admin().audit(&entry).await {
                tracing::error!(%error, %method, count, "summed-up admin refusals could not be written; kept for the next flush");
                self.suppress(&caller, &method, &outcome, count);
            }
        }
    }
}

/// `text` with every control character (NUL, newline, ESC, DEL, C1) written `\u{XX}` and a
/// backslash written `\\`: nothing is lost, and reading it back is unambiguous.
pub fn printable(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.chars().any(|c| c.is_control() || c == '\\') {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{{{:x}}}", u32::from(c))),
            c => out.push(c),
        }
    }
    std::borrow::Cow::Owned(out)
}

/// How long an audit row that PostgreSQL did not take is tried again (within the time shutdown
/// gives admin calls still running).
pub const AUDIT_RETRY: std::time::Duration = std::time::Duration::from_secs(4);

/// The request id of a row that sums refusals up (its `count` says how many).
pub const SUMMED_UP: &str = "(refused calls over the audit rate, summed up)";

/// Refused calls written one row each, per second and instance (a burst of twice that).
pub const REFUSED_ROWS_PER_SECOND: f64 = 20.0;

/// A token bucket for refused-call rows.
struct RowBudget {
    tokens: f64,
    at: std::time::Instant,
}

impl RowBudget {
    fn take(&mut self) -> bool {
        let now = std::time::Instant::now();
        let burst = REFUSED_ROWS_PER_SECOND * 2.0;
        self.tokens = (self.tokens
            + now.duration_since(self.at).as_secs_f64() * REFUSED_ROWS_PER_SECOND)
            .min(burst);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::printable;

    #[test]
    fn control_characters_and_backslashes_are_escaped_and_nothing_else() {
        assert_eq!(printable("alice@example.com"), "alice@example.com");
        assert_eq!(printable("a\0b"), "a\\u{0}b");
        assert_eq!(printable("line\nnext"), "line\\u{a}next");
        assert_eq!(printable("\x1b[31mred"), "\\u{1b}[31mred");
        assert_eq!(printable("\u{9b}c1 \u{7f}"), "\\u{9b}c1 \\u{7f}");
        assert_eq!(printable("back\\slash"), "back\\\\slash");
        assert_eq!(printable("δ ü 日本"), "δ ü 日本");
    }
}
