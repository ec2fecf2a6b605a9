//! The docs run: README's first hour with grpcurl is played against the binary, in order, in
//! one shell (so `$TOKEN` and the like carry from step to step), and what each example shows
//! is compared with what the server answered — ids, times and tokens aside. An example that
//! drifts from the service fails here.
use std::{process::Command, time::Duration};

use secrecy::ExposeSecret;

use crate::binary::{Binary, command};

/// A step of an example: commands, and what they must print.
#[derive(Debug)]
enum Step {
    /// A ```sh block: run; it must succeed. `shows`: the ```json blocks after it. What it
    /// printed is JSON documents only, matching them: one each, or each the one shown (a block
    /// that asks the same twice); nothing, when none is shown.
    Run { script: String, shows: Vec<String> },
    /// A `$ command` of a ```console block, and the lines after it: its output (stdout and
    /// stderr, as a terminal shows them), which must match.
    Console { command: String, output: String },
}

/// The steps of the section of `doc` under `heading`, in order.
fn steps(doc: &str, heading: &str) -> Vec<Step> {
    let section = doc
        .split(&format!("\n{heading}\n"))
        .nth(1)
        .unwrap_or_else(|| panic!("no {heading:?}"));
    let section = section.split("\n## ").next().unwrap_or(section);
    let mut steps = Vec::new();
    let mut blocks = section.split("\n```").skip(1).step_by(2);
    for block in blocks.by_ref() {
        let (lang, body) = block.split_once('\n').unwrap_or((block, ""));
        match lang.trim() {
            "sh" => steps.push(Step::Run {
                script: body.to_owned(),
                shows: Vec::new(),
            }),
            "json" => match steps.last_mut() {
                Some(Step::Run { shows, .. }) => shows.push(body.to_owned()),
                _ => panic!("a json block follows no sh block: {body}"),
            },
            "console" => {
                for line in body.lines() {
                    match (line.strip_prefix("$ "), steps.last_mut()) {
                        (Some(command), _) => steps.push(Step::Console {
                            command: command.to_owned(),
                            output: String::new(),
                        }),
                        (None, Some(Step::Console { output, .. })) => {
                            output.push_str(line);
                            output.push('\n');
                        }
                        (None, _) => panic!("a console block starts with no `$ `: {body}"),
                    }
                }
            }
            other => panic!("a {other:?} block: say how to run it"),
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

/// The steps as one bash script: each step's output between markers.
fn script(steps: &[Step], addr: &str) -> String {
    let mut script = String::from("set -eo pipefail\n");
    for (i, step) in steps.iter().enumerate() {
        let body = match step {
            Step::Run { script, .. } => format!("{{\n{script}\n}} 2>&1"),
            // A console example may show an error: it must not end the run.
            Step::Console { command, .. } => format!("{{ {command}\n}} 2>&1 || true"),
        };
        script.push_str(&format!(
            "echo '@@step {i}'\n{}\n",
            body.replace("127.0.0.1:50051", addr)
                .replace("localhost:50051", addr)
        ));
    }
    script.push_str("echo '@@done'\n");
    script
}

/// README's tour, on a fresh database, as a newcomer runs it after `cargo run`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readme_first_hour_runs_as_written() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md");
    let steps = steps(&readme, "## A first hour with grpcurl");
    assert!(steps.len() >= 5, "the tour was found: {steps:?}");
    let settings = crate::helpers::test_settings(crate::helpers::Mode::Redis);
    let binary = Binary::start(command(&settings, &crate::helpers::redis_url())).await;
    let script = script(&steps, &binary.addr);
    let run = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::task::spawn_blocking(move || Command::new("bash").arg("-c").arg(&script).output()),
    )
    .await
    .expect("the tour ran within 2 minutes")
    .unwrap()
    .expect("bash runs (grpcurl and jq on PATH)");
    let stdout = String::from_utf8_lossy(&run.stdout).into_owned();
    assert!(
        run.status.success() && stdout.contains("@@done"),
        "a step failed: {stdout}\n{}\nthe server said: {}",
        String::from_utf8_lossy(&run.stderr),
        binary.output()
    );
    let outputs: Vec<&str> = stdout
        .split("@@step ")
        .skip(1)
        .map(|o| o.split_once('\n').map_or("", |(_, rest)| rest))
        .collect();
    assert_eq!(outputs.len(), steps.len(), "{stdout}");
    for (step, output) in steps.iter().zip(outputs) {
        let output = output.trim_end_matches("@@done\n");
        match step {
            Step::Run { script, shows } => {
                let shown: Vec<serde_json::Value> = shows
                    .iter()
                    .map(|s| serde_json::from_str(&normalize(s)))
                    .collect::<Result<_, _>>()
                    .unwrap_or_else(|e| panic!("README's json after {script:?}: {e}"));
                let printed = documents(&normalize(output))
                    .unwrap_or_else(|| panic!("{script:?} printed more than JSON: {output}"));
                let matches = match shown.len() {
                    1 => !printed.is_empty() && printed.iter().all(|p| *p == shown[0]),
                    _ => printed == shown,
                };
                assert!(
                    matches,
                    "{script}\nprinted: {printed:#?}\nREADME shows: {shown:#?}"
                );
            }
            Step::Console {
                command,
                output: shown,
            } => {
                assert_eq!(normalize(output), normalize(shown), "$ {command}");
            }
        }
    }
    drop(binary);
    crate::helpers::drop_database(settings.database.url.expose_secret()).await;
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
