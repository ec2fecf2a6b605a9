//! Callers as processes of their own, as a fleet runs them: the client crate's strict
//! `Validator` in caller processes beside three authd instances, and a caller stopped
//! (SIGSTOP) while a revocation waits for it.
//!
//! A caller process is this test binary started again on [`caller_process`] (ignored unless
//! started so): it follows the stream of the instance [`CALLER_ENV`] names, and answers each
//! line of stdin (`ID REQUEST`, answered concurrently) with a line of stdout (`caller: ID
//! ANSWER`).
use std::{
    collections::HashMap,
    process::Stdio,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use authd::proto::authd::v1 as pb;
use authd_client::{Config, Mode as ClientMode, Validator};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    process::{Child, ChildStdin, Command},
    sync::oneshot,
};

use super::{SUBSCRIBER_KEY, subscribed_settings};
use crate::helpers::{Mode, PASSWORD, TestApp, eventually, spawn_sharing, spawn_with};

/// The address of the instance a caller process follows.
const CALLER_ENV: &str = "AUTHD_TEST_CALLER_OF";
/// What a caller's answers start with (the test harness prints lines of its own).
const ANSWER: &str = "caller: ";

/// A caller process: `validate TOKEN` answers `ok SESSION_ID` or `refused CODE`; `profile
/// USER_ID` answers `version N` or `refused CODE`; `hits` the validations and the profiles
/// answered from memory so far. Its first line, once it trusts its memory: `0 ready`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a caller process, started by the tests of events::process"]
async fn caller_process() {
    let addr = std::env::var(CALLER_ENV).expect("started by a test, which names the instance");
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_lazy();
    let validator = Validator::new(
        channel,
        Config {
            mode: ClientMode::Strict,
            api_key: Some(SUBSCRIBER_KEY.to_owned()),
            ..Config::default()
        },
    );
    eventually(
        Duration::from_secs(20),
        "the caller trusts its memory",
        || async { validator.trusted() },
    )
    .await;
    println!("{ANSWER}0 ready");
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = lines.next_line().await.unwrap() {
        let validator = validator.clone();
        tokio::spawn(async move {
            let (id, request) = line.split_once(' ').expect("ID REQUEST");
            let (verb, argument) = request.split_once(' ').unwrap_or((request, ""));
            let answer = match verb {
                "validate" => match validator.validate(argument).await {
                    Ok(session) => format!("ok {}", session.session_id),
                    Err(status) => format!("refused {:?}", status.code()),
                },
                "profile" => match validator.profile(argument).await {
                    Ok(profile) => format!("version {}", profile.version),
                    Err(status) => format!("refused {:?}", status.code()),
                },
                "hits" => format!(
                    "{} {}",
                    validator.local_hits(),
                    validator.local_profile_hits()
                ),
                other => panic!("no such request: {other}"),
            };
            println!("{ANSWER}{id} {answer}");
        });
    }
}

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<String>>>>;

/// A caller process; requests may be asked concurrently.
struct Caller {
    child: Child,
    stdin: tokio::sync::Mutex<ChildStdin>,
    pending: Pending,
    next: AtomicU64,
}

impl Caller {
    /// Starts a caller following `app`'s stream; returns once it trusts its memory.
    async fn start(app: &TestApp) -> Self {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "events::process::caller_process",
                "--exact",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CALLER_ENV, app.addr.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
        let pending = Pending::default();
        let (ready, came_up) = oneshot::channel();
        pending.lock().unwrap().insert(0, ready);
        let answers = pending.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = stdout.next_line().await {
                // The harness's own `test … ... ` has no line end: the first answer follows it.
                let Some((_, answer)) = line.split_once(ANSWER) else {
                    continue;
                };
                let (id, answer) = answer.split_once(' ').expect("ID ANSWER");
                let waiting = answers.lock().unwrap().remove(&id.parse().unwrap());
                if let Some(waiting) = waiting {
                    let _ = waiting.send(answer.to_owned());
                }
            }
        });
        let ready = tokio::time::timeout(Duration::from_secs(30), came_up)
            .await
            .expect("the caller process came up")
            .expect("the caller process answers");
        assert_eq!(ready, "ready");
        Self {
            child,
            stdin: tokio::sync::Mutex::new(stdin),
            pending,
            next: AtomicU64::new(1),
        }
    }

    async fn ask(&self, request: &str) -> String {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (answer, answered) = oneshot::channel();
        self.pending.lock().unwrap().insert(id, answer);
        self.stdin
            .lock()
            .await
            .write_all(format!("{id} {request}\n").as_bytes())
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_secs(30), answered)
            .await
            .unwrap_or_else(|_| panic!("the caller answered {request:?} in time"))
            .expect("the caller process answers")
    }

    async fn version(&self, user_id: &str) -> i64 {
        let answer = self.ask(&format!("profile {user_id}")).await;
        answer
            .strip_prefix("version ")
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("a profile: {answer}"))
    }

    /// Validations and profiles answered from memory so far.
    async fn hits(&self) -> (u64, u64) {
        let answer = self.ask("hits").await;
        let (sessions, profiles) = answer.split_once(' ').expect("two counts");
        (sessions.parse().unwrap(), profiles.parse().unwrap())
    }

    fn signal(&self, signal: libc::c_int) {
        let pid = self.child.id().expect("the caller runs");
        // SAFETY: kill(2) with a live child's pid and a valid signal number.
        let rc = unsafe { libc::kill(i32::try_from(pid).unwrap(), signal) };
        assert_eq!(rc, 0, "signal {signal} to the caller");
    }
}

fn bio(text: &str) -> pb::Profile {
    pb::Profile {
        bio: text.into(),
        ..Default::default()
    }
}

/// 3 instances, 2 caller processes (each following another instance): 1,000 rounds of a change
/// on one instance (an UpdateProfile, then a Logout), then at once a check in both callers. No
/// caller accepts a token whose Logout returned, nor answers a profile older than the
/// UpdateProfile that returned — though they answer from their own memory in between. The
/// rounds run in 4 lanes at once (a user each), as a fleet's callers do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caller_processes_accept_nothing_revoked_and_no_older_profile() {
    const ROUNDS: usize = 1_000;
    const LANES: usize = 4;
    let dir = tempfile::tempdir().unwrap();
    let first = spawn_with(subscribed_settings(Mode::Redis, dir.path())).await;
    let second = spawn_sharing(&first, |_| {}).await;
    let third = spawn_sharing(&first, |_| {}).await;
    let fleet = [&first, &second, &third];
    let callers = [Caller::start(&second).await, Caller::start(&third).await];
    let lane = |lane: usize| {
        let (fleet, callers, first) = (&fleet, &callers, &first);
        async move {
            let (_, registered) = first.register().await;
            let user = registered.user_id;
            let mut version = first.get_profile(&user).await.unwrap().version;
            // A session per round, written to the store as a Login would (without its
            // password hash).
            let url = secrecy::ExposeSecret::expose_secret(&first.settings.database.url);
            let tokens = crate::seeded::seed(&first.db, url, user.parse().unwrap(), ROUNDS / LANES)
                .await
                .unwrap();
            for (k, token) in tokens.into_iter().enumerate() {
                let round = k * LANES + lane;
                for caller in callers {
                    for _ in 0..2 {
                        let answer = caller.ask(&format!("validate {token}")).await;
                        assert!(answer.starts_with("ok "), "round {round}: {answer}");
                    }
                    // Cached from here on, until the next update.
                    for _ in 0..2 {
                        assert_eq!(caller.version(&user).await, version, "round {round}");
                    }
                }
                let updated = fleet[(round + 2) % 3]
                    .update_profile(&token, bio(&format!("round {round}")), &["bio"], version)
                    .await
                    .unwrap();
                version = updated.version;
                let [a, b] = callers;
                let (on_a, on_b) = tokio::join!(a.version(&user), b.version(&user));
                assert!(
                    on_a >= version && on_b >= version,
                    "round {round}: a caller answered an older profile ({on_a}, {on_b} < \
                     {version})"
                );
                fleet[(round + 1) % 3].logout(&token).await.unwrap();
                let check = format!("validate {token}");
                let (on_a, on_b) = tokio::join!(a.ask(&check), b.ask(&check));
                for answer in [on_a, on_b] {
                    assert_eq!(
                        answer, "refused Unauthenticated",
                        "round {round}: a caller accepted a token whose Logout returned"
                    );
                }
            }
        }
    };
    futures::future::join_all((0..LANES).map(lane)).await;
    for caller in &callers {
        let (sessions, profiles) = caller.hits().await;
        assert!(
            sessions >= ROUNDS as u64 && profiles >= ROUNDS as u64,
            "the caller answered from its memory ({sessions} validations, {profiles} profiles \
             in {ROUNDS} rounds)"
        );
    }
}

/// A caller stopped while a Logout waits for it: the Logout returns once the caller's lease
/// ran out (at most the lease, plus 1% and 100 ms, as README states), and the caller, resumed,
/// refuses the token on its first check.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_caller_holds_a_revocation_no_longer_than_its_lease() {
    let dir = tempfile::tempdir().unwrap();
    let mut settings = subscribed_settings(Mode::Redis, dir.path());
    let lease = Duration::from_secs(2);
    settings.local_cache.lease = lease;
    let app = spawn_with(settings).await;
    let caller = Caller::start(&app).await;
    let (email, _) = app.register().await;
    let login = app.login(&email, PASSWORD).await.unwrap();
    let token = login.session_token;
    for _ in 0..2 {
        let answer = caller.ask(&format!("validate {token}")).await;
        assert!(answer.starts_with("ok "), "{answer}");
    }
    assert!(
        caller.hits().await.0 >= 1,
        "the token is in the caller's memory"
    );
    caller.signal(libc::SIGSTOP);
    let started = std::time::Instant::now();
    app.logout(&token).await.unwrap();
    let waited = started.elapsed();
    // The lease was last extended before the stop: the wait ends within the lease and the
    // stated margin (and some room for this machine's scheduling).
    let most = lease.mul_f64(1.01) + Duration::from_millis(100) + Duration::from_millis(500);
    assert!(
        waited <= most,
        "Logout waited {waited:?} for a stopped caller (at most {most:?})"
    );
    assert!(
        waited >= lease / 2,
        "Logout returned after {waited:?}: it did not wait for the caller's lease"
    );
    caller.signal(libc::SIGCONT);
    assert_eq!(
        caller.ask(&format!("validate {token}")).await,
        "refused Unauthenticated",
        "the resumed caller accepted a token whose Logout returned"
    );
    // And it comes back: a new stream, a new lease, its memory used again.
    let again = app.login(&email, PASSWORD).await.unwrap().session_token;
    let before = caller.hits().await.0;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let answer = caller.ask(&format!("validate {again}")).await;
        assert!(answer.starts_with("ok "), "{answer}");
        if caller.hits().await.0 > before {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the resumed caller answers from memory again"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
