//! The docs run: README's first hour with grpcurl and every example of docs/api.md are played
//! against the binary, in order (so `$TOKEN` and the like carry from step to step), each on the
//! server its text starts (`VAR=value … cargo run`), and what each example shows is compared
//! with what the server answered — ids, times, keys and tokens aside. An example that drifts
//! from the service fails here. Every other example in README and docs/ carries a note saying
//! why no test runs it (`<!-- docs-test: skip REASON -->`), and a test holds them to that.
use std::{process::Stdio, time::Duration};

use secrecy::ExposeSecret;

use crate::binary::{Binary, command, free_port};

/// A fenced block of a document.
#[derive(Debug)]
struct Fence {
    lang: String,
    body: String,
    /// The reason of a `<!-- docs-test: skip REASON -->` note before it (or before the example
    /// whose output it shows).
    skipped: Option<String>,
    /// A `<!-- docs-test: server VAR=value … -->` note before it: the server it needs, where
    /// the text says so in words.
    server: Option<String>,
    line: usize,
}

/// The languages of examples that run (the others show text, output or configuration).
const EXAMPLES: [&str; 3] = ["sh", "console", "python"];

/// The fenced blocks of `doc`, in order (indented ones, in lists, included).
fn fences(doc: &str) -> Vec<Fence> {
    let mut fences: Vec<Fence> = Vec::new();
    let (mut skip, mut server) = (None, None);
    let mut lines = doc.lines().enumerate();
    while let Some((number, line)) = lines.next() {
        let trimmed = line.trim();
        if let Some(note) = trimmed
            .strip_prefix("<!-- docs-test:")
            .and_then(|n| n.strip_suffix("-->"))
        {
            let note = note.trim();
            if let Some(reason) = note.strip_prefix("skip ") {
                skip = Some(reason.trim().to_owned());
            } else if let Some(env) = note.strip_prefix("server") {
                server = Some(env.trim().to_owned());
            } else {
                panic!("line {}: a docs-test note of no kind: {note}", number + 1);
            }
            continue;
        }
        let Some(lang) = trimmed.strip_prefix("```") else {
            continue;
        };
        let indent = line.len() - line.trim_start().len();
        let body: Vec<&str> = lines
            .by_ref()
            .map(|(_, l)| l)
            .take_while(|l| !l.trim_start().starts_with("```"))
            .map(|l| l.get(indent..).unwrap_or(l.trim_start()))
            .collect();
        let lang = lang.trim().to_owned();
        // The output of a skipped example is skipped with it.
        let skipped = match (&skip, fences.last()) {
            (None, Some(last)) if lang == "json" => last.skipped.clone(),
            _ => skip.take(),
        };
        fences.push(Fence {
            lang,
            body: body.join("\n"),
            skipped,
            server: server.take(),
            line: number + 1,
        });
    }
    fences
}

/// A step of an example.
#[derive(Debug)]
enum Step {
    /// A server as the text starts it: the steps after it run against it.
    Server { env: Vec<(String, String)> },
    /// Commands (a ```sh block, or a ```python one run by `python3`); they must succeed.
    /// `shows`: the ```json blocks after it. When it shows any, what it printed is JSON
    /// documents only, matching them: one each, or each the one shown (a block that asks the
    /// same twice).
    Run { script: String, shows: Vec<String> },
    /// A `$ command` of a ```console block, and the lines after it: its output (stdout and
    /// stderr, as a terminal shows them), which must match.
    Console { command: String, output: String },
}

/// `VAR=value` words (the environment a command line sets), up to the first other word.
fn assignments(words: &str) -> Vec<(String, String)> {
    words
        .split_whitespace()
        .map_while(|word| {
            let (name, value) = word.split_once('=')?;
            name.chars()
                .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
                .then(|| (name.to_owned(), value.to_owned()))
        })
        .collect()
}

/// A ```sh block's steps: one that starts the server (`VAR=value … cargo run …`) is the
/// commands before that line, the server, and the commands after it.
fn sh_steps(body: &str, steps: &mut Vec<Step>) {
    // Logical lines: a line ending in `\` goes on.
    let mut logical: Vec<String> = Vec::new();
    let mut open = false;
    for line in body.lines() {
        match (open, logical.last_mut()) {
            (true, Some(last)) => {
                last.push('\n');
                last.push_str(line);
            }
            _ => logical.push(line.to_owned()),
        }
        open = line.ends_with('\\');
    }
    let Some(at) = logical.iter().position(|l| l.contains("cargo run")) else {
        steps.push(Step::Run {
            script: body.to_owned(),
            shows: Vec::new(),
        });
        return;
    };
    let before = logical[..at].join("\n");
    if !before.trim().is_empty() {
        steps.push(Step::Run {
            script: before,
            shows: Vec::new(),
        });
    }
    let start = logical[at].replace("\\\n", " ");
    let env = assignments(&start);
    // What follows the settings must be the server itself: `cargo run`, maybe `--release`,
    // `-- serve`, in the background.
    let command: Vec<&str> = start.split_whitespace().skip(env.len()).collect();
    assert!(
        matches!(
            command[..],
            ["cargo", "run"]
                | ["cargo", "run", "--release"]
                | ["cargo", "run", "--", "serve"]
                | ["cargo", "run", "--release", "--", "serve"]
                | ["cargo", "run", "--release", "--", "serve", "&"]
                | ["cargo", "run", "--", "serve", "&"]
        ),
        "a `cargo run` the docs test cannot start as a server: {start}"
    );
    steps.push(Step::Server { env });
    let after = logical[at + 1..].join("\n");
    if !after.trim().is_empty() {
        steps.push(Step::Run {
            script: after,
            shows: Vec::new(),
        });
    }
}

/// The steps of `doc`'s examples, in order; skipped ones left out. The first server is
/// `cargo run`'s, with no settings.
fn steps(doc: &str) -> Vec<Step> {
    let mut steps = vec![Step::Server { env: Vec::new() }];
    for fence in fences(doc).into_iter().filter(|f| f.skipped.is_none()) {
        if let Some(env) = &fence.server {
            steps.push(Step::Server {
                env: assignments(env),
            });
        }
        match fence.lang.as_str() {
            "sh" => sh_steps(&fence.body, &mut steps),
            "python" => steps.push(Step::Run {
                script: format!("python3 - <<'PYTHON'\n{}\nPYTHON", fence.body),
                shows: Vec::new(),
            }),
            "json" => match steps.last_mut() {
                Some(Step::Run { shows, .. }) => shows.push(fence.body),
                _ => panic!("line {}: a json block follows no example", fence.line),
            },
            "console" => {
                for line in fence.body.lines() {
                    match (line.strip_prefix("$ "), steps.last_mut()) {
                        (Some(command), _) => steps.push(Step::Console {
                            command: command.to_owned(),
                            output: String::new(),
                        }),
                        (None, Some(Step::Console { output, .. })) => {
                            output.push_str(line);
                            output.push('\n');
                        }
                        (None, _) => panic!("line {}: no `$ ` to begin with", fence.line),
                    }
                }
            }
            // Text, configuration and output shown for reading.
            _ => {}
        }
    }
    steps
}

/// What differs from run to run, replaced by its kind.
fn normalize(text: &str) -> String {
    let patterns = [
        (
            r"authd_[A-Za-z0-9_-]{43}\.[0-9]+\.[A-Za-z0-9_-]{22}",
            "<token>",
        ),
        (
            r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}",
            "<uuid>",
        ),
        (
            r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?Z",
            "<time>",
        ),
        // A stream's position.
        (
            r#""position": ?"[A-Za-z0-9+/=_-]+""#,
            r#""position": "<position>""#,
        ),
        // A key's thumbprint and public half (a JWK's `kid`, `x`, `y`).
        (r#""[A-Za-z0-9_-]{43}""#, r#""<key>""#),
    ];
    // Trailing spaces are an editor's to keep or drop, not the example's.
    let mut text: String = text
        .trim_end()
        .lines()
        .map(str::trim_end)
        .collect::<Vec<_>>()
        .join("\n");
    for (pattern, kind) in patterns {
        text = regex::Regex::new(pattern)
            .unwrap()
            .replace_all(&text, kind)
            .into_owned();
    }
    text
}

/// The JSON documents `output` is made of; `None` if anything else is in it.
fn documents(output: &str) -> Option<Vec<serde_json::Value>> {
    serde_json::Deserializer::from_str(output)
        .into_iter::<serde_json::Value>()
        .collect::<Result<_, _>>()
        .ok()
}

/// Whether `printed` is what `shown` shows: equal, except that a string ending in `…` shows
/// its beginning, and an object with a `"..."` key shows some of its fields.
fn shows(shown: &serde_json::Value, printed: &serde_json::Value) -> bool {
    use serde_json::Value;
    match (shown, printed) {
        (Value::String(shown), Value::String(printed)) => match shown.strip_suffix('…') {
            Some(start) => printed.starts_with(start),
            None => shown == printed,
        },
        (Value::Array(shown), Value::Array(printed)) => {
            shown.len() == printed.len() && shown.iter().zip(printed).all(|(s, p)| shows(s, p))
        }
        (Value::Object(shown), Value::Object(printed)) => {
            let some = shown.contains_key("...");
            shown
                .iter()
                .filter(|(key, _)| *key != "...")
                .all(|(key, s)| printed.get(key).is_some_and(|p| shows(s, p)))
                && (some || shown.len() == printed.len())
        }
        _ => shown == printed,
    }
}

/// Plays `steps` in a directory of their own, each server on the test's database and Redis.
/// `silent`: an example that shows no output must print none (README's tour shows every
/// output); otherwise only what is shown is compared.
async fn play(steps: &[Step], silent: bool) {
    let settings = crate::helpers::test_settings(crate::helpers::Mode::Redis);
    let dir = tempfile::tempdir().unwrap();
    // The variables the examples set, kept from step to step.
    let assigned = regex::Regex::new(r"(?m)(?:^\s*|[;&|]\s*|export\s+)([A-Z][A-Z0-9_]*)=").unwrap();
    let mut names: Vec<String> = Vec::new();
    for step in steps {
        if let Step::Run { script, .. } = step {
            for found in assigned.captures_iter(script) {
                if !names.contains(&found[1].to_owned()) {
                    names.push(found[1].to_owned());
                }
            }
        }
    }
    let mut server: Option<Binary> = None;
    let mut ports: Vec<(String, String)> = Vec::new();
    for (i, step) in steps.iter().enumerate() {
        let (script, console) = match step {
            Step::Server { env } => {
                drop(server.take());
                let metrics = format!("127.0.0.1:{}", free_port());
                let health = format!("127.0.0.1:{}", free_port());
                let mut cmd = command(&settings, &crate::helpers::redis_url());
                cmd.current_dir(dir.path())
                    .env("METRICS__ADDR", &metrics)
                    // Its "authd serving" line says it is ready, TLS or not.
                    .env("LOG__LEVEL", "warn,authd::app=info");
                for (name, value) in env {
                    cmd.env(name, value.replace("127.0.0.1:8081", &health));
                }
                let started = Binary::spawn(cmd);
                started
                    .wait_for_line(&["authd serving"], Duration::from_secs(30))
                    .await;
                let port = started.addr.rsplit(':').next().unwrap().to_owned();
                ports = vec![
                    ("127.0.0.1:50051".to_owned(), started.addr.clone()),
                    ("localhost:50051".to_owned(), format!("localhost:{port}")),
                    ("127.0.0.1:9090".to_owned(), metrics),
                    ("127.0.0.1:8081".to_owned(), health),
                ];
                server = Some(started);
                continue;
            }
            Step::Run { script, .. } => (script, false),
            Step::Console { command, .. } => (command, true),
        };
        let mut script = script.clone();
        for (from, to) in &ports {
            script = script.replace(from, to);
        }
        // Any other address of authd's ports would reach something else on this machine.
        for port in [":50051", ":9090", ":8081"] {
            assert!(
                !script.contains(port),
                "step {i} names a port the docs test does not map: {script}"
            );
        }
        // A console example may show an error: it must not end the run.
        let body = match console {
            true => format!("{{ {script}\n}} 2>&1 || true"),
            false => format!("{{\n{script}\n}} 2>&1"),
        };
        let whole = format!(
            "set -eo pipefail\nset -a\nsource ./.state 2>/dev/null || true\nset +a\n{body}\n\
             declare -p {} > ./.state 2>/dev/null || true\n",
            names.join(" ")
        );
        let run = tokio::process::Command::new("bash")
            .arg("-c")
            .arg(&whole)
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output();
        let run = tokio::time::timeout(Duration::from_secs(60), run)
            .await
            .unwrap_or_else(|_| panic!("step {i} ran over a minute: {script}"))
            .expect("bash runs (grpcurl, jq, openssl and python3 on PATH)");
        let output = String::from_utf8_lossy(&run.stdout).into_owned();
        let said = || server.as_ref().map(Binary::output).unwrap_or_default();
        assert!(
            run.status.success(),
            "step {i} failed: {script}\nit printed: {output}{}\nthe server said: {}",
            String::from_utf8_lossy(&run.stderr),
            said()
        );
        match step {
            Step::Run {
                script,
                shows: shown,
            } => {
                let printed = documents(&normalize(&output));
                if shown.is_empty() {
                    assert!(
                        !silent || printed.as_ref().is_some_and(Vec::is_empty),
                        "{script}\nprinted what the doc does not show: {output}"
                    );
                    continue;
                }
                let shown: Vec<serde_json::Value> = shown
                    .iter()
                    .map(|s| serde_json::from_str(&normalize(s)))
                    .collect::<Result<_, _>>()
                    .unwrap_or_else(|e| panic!("the json after {script:?}: {e}"));
                let printed = printed
                    .unwrap_or_else(|| panic!("{script:?} printed more than JSON: {output}"));
                let matches = match shown.len() {
                    1 => !printed.is_empty() && printed.iter().all(|p| shows(&shown[0], p)),
                    _ => {
                        printed.len() == shown.len()
                            && shown.iter().zip(&printed).all(|(s, p)| shows(s, p))
                    }
                };
                assert!(
                    matches,
                    "{script}\nprinted: {printed:#?}\nthe doc shows: {shown:#?}\nthe server said: {}",
                    said()
                );
            }
            Step::Console {
                command,
                output: shown,
            } => {
                assert_eq!(normalize(&output), normalize(shown), "$ {command}");
            }
            Step::Server { .. } => unreachable!(),
        }
    }
    drop(server);
    crate::helpers::drop_database(settings.database.url.expose_secret()).await;
}

fn read(path: &str) -> String {
    std::fs::read_to_string(format!("{}/{path}", env!("CARGO_MANIFEST_DIR")))
        .unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The section of `doc` under `heading` (to the next `## `).
fn section<'a>(doc: &'a str, heading: &str) -> &'a str {
    let section = doc
        .split(&format!("\n{heading}\n"))
        .nth(1)
        .unwrap_or_else(|| panic!("no {heading:?}"));
    section.split("\n## ").next().unwrap_or(section)
}

/// The tour of README, under this heading, runs as a whole; the rest of README is skipped
/// block by block.
const TOUR: &str = "## A first hour with grpcurl";

/// README's tour, on a fresh database, as a newcomer runs it after `cargo run`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readme_first_hour_runs_as_written() {
    let readme = read("README.md");
    let steps = steps(section(&readme, TOUR));
    assert!(steps.len() >= 5, "the tour was found: {steps:?}");
    play(&steps, true).await;
}

/// docs/api.md from top to bottom: each RPC's example, the errors it shows, AdminService over
/// mutual TLS and with a key, the event stream, Envoy's Check, JWTs and the JWKS — each on the
/// server its text starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_reference_runs_as_written() {
    let steps = steps(&read("docs/api.md"));
    assert!(
        steps
            .iter()
            .filter(|s| matches!(s, Step::Server { .. }))
            .count()
            >= 4,
        "the servers were found: {steps:?}"
    );
    play(&steps, false).await;
}

/// Every example (```sh, ```console, ```python) of README and docs/ is run by a test above, or
/// says why none runs it: a new example cannot be left untested by oversight.
#[test]
fn every_example_runs_or_says_why_not() {
    let mut docs = vec!["README.md".to_owned()];
    for entry in std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/docs")).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        if name.ends_with(".md") {
            docs.push(format!("docs/{name}"));
        }
    }
    let mut unaccounted = Vec::new();
    let mut run = 0;
    for doc in &docs {
        let text = read(doc);
        // The lines of README's tour, which runs whole.
        let tour = (doc == "README.md").then(|| {
            let start = text[..text.find(&format!("\n{TOUR}\n")).unwrap()]
                .lines()
                .count();
            start..start + section(&text, TOUR).lines().count() + 2
        });
        for fence in fences(&text) {
            let runs = doc == "docs/api.md"
                || tour
                    .as_ref()
                    .is_some_and(|lines| lines.contains(&fence.line));
            if !EXAMPLES.contains(&fence.lang.as_str()) {
                continue;
            }
            match (&fence.skipped, runs) {
                (Some(reason), _) => assert!(reason.len() > 10, "{doc}:{}: a reason", fence.line),
                (None, true) => run += 1,
                (None, false) => unaccounted.push(format!("{doc}:{}", fence.line)),
            }
        }
    }
    assert!(run > 30, "the runnable examples were found ({run})");
    assert!(
        unaccounted.is_empty(),
        "examples no test runs and no note explains: {unaccounted:?}"
    );
}

/// Every metric a document, a manifest or an alert names (`authd_*`, `process_*`) is one the
/// binary serves at `/metrics`: a renamed metric cannot leave a dashboard or an alert behind.
/// The binary runs with Redis and the in-process cache, whose metrics appear with them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_docs_name_is_served() {
    // PostgreSQL roles of the compose file and docs/operations.md, not metrics.
    const NOT_METRICS: [&str; 2] = ["authd_app", "authd_owner"];
    let root = env!("CARGO_MANIFEST_DIR");
    let mut files = vec![
        format!("{root}/README.md"),
        format!("{root}/CHANGELOG.md"),
        format!("{root}/docker-compose.yaml"),
    ];
    let mut dirs = vec![format!("{root}/docs"), format!("{root}/deploy")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path.display().to_string());
            } else {
                files.push(path.display().to_string());
            }
        }
    }
    // A whole word: a token (`authd_pilfam…Q.1.b6u…`) is not a name.
    let word = regex::Regex::new(r"\b(authd|process)_[A-Za-z0-9_.-]*").unwrap();
    let name = regex::Regex::new(r"^(authd|process)_[a-z0-9_]*[a-z0-9]$").unwrap();
    let mut named: Vec<(String, String)> = Vec::new();
    for file in &files {
        let Ok(text) = std::fs::read_to_string(file) else {
            continue;
        };
        for found in word.find_iter(&text) {
            let found = found.as_str().trim_end_matches(['.', '-']);
            if name.is_match(found) && !NOT_METRICS.contains(&found) {
                named.push((found.to_owned(), file.clone()));
            }
        }
    }
    assert!(named.len() > 40, "the docs were read: {named:?}");

    let settings = crate::helpers::test_settings(crate::helpers::Mode::Redis);
    let metrics: std::net::SocketAddr = format!("127.0.0.1:{}", crate::binary::free_port())
        .parse()
        .unwrap();
    let mut cmd = command(&settings, &crate::helpers::redis_url());
    cmd.env("LOCAL_CACHE__ENABLED", "true")
        .env("METRICS__ADDR", metrics.to_string());
    let binary = Binary::start(cmd).await;
    // The per-node Redis gauges come with the first periodic check.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let served = loop {
        let text = crate::binary::scrape_from(metrics, [127, 0, 0, 1]).await;
        if text.contains("\nauthd_redis_node_up{") {
            break text;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no Redis node check: {text}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // Families, and a histogram's series (`_bucket`, `_sum`, `_count`).
    let mut families: Vec<String> = Vec::new();
    for line in served.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split(' ');
            let (family, kind) = (parts.next().unwrap(), parts.next().unwrap_or_default());
            families.push(family.to_owned());
            if kind == "histogram" {
                for suffix in ["_bucket", "_sum", "_count"] {
                    families.push(format!("{family}{suffix}"));
                }
            }
        }
    }
    let missing: Vec<&(String, String)> = named
        .iter()
        .filter(|(name, _)| !families.contains(name))
        .collect();
    assert!(
        missing.is_empty(),
        "named but not served: {missing:?}\nserved: {families:?}"
    );
    drop(binary);
    crate::helpers::drop_database(settings.database.url.expose_secret()).await;
}
