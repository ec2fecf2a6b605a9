//! Runs the checker deeper than `cargo test` does:
//! `cargo run --release -p authd-model -- [--depth N] [--threads N] [SCENARIO...]`
//! (scenarios: see `authd_model::scenarios`; all of them by default).
use std::time::Instant;

use stateright::{Checker, Model};

fn main() {
    let mut depth = authd_model::scenarios::DEEP_DEPTH;
    let mut threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let mut names = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--depth" => depth = args.next().and_then(|d| d.parse().ok()).expect("--depth N"),
            "--threads" => {
                threads = args
                    .next()
                    .and_then(|d| d.parse().ok())
                    .expect("--threads N")
            }
            "-h" | "--help" => {
                println!("authd-model [--depth N] [--threads N] [SCENARIO...]");
                for (name, _) in authd_model::scenarios::all() {
                    println!("  {name}");
                }
                return;
            }
            name => names.push(name.to_owned()),
        }
    }
    let mut failed = false;
    for (name, cfg) in authd_model::scenarios::all() {
        if !names.is_empty() && !names.iter().any(|n| n == name) {
            continue;
        }
        let started = Instant::now();
        let checker = authd_model::Protocol { cfg }
            .checker()
            .threads(threads)
            .target_max_depth(depth)
            .spawn_bfs()
            .join();
        let found = checker.discoveries();
        let broken: Vec<&str> = authd_model::properties::SAFETY
            .iter()
            .copied()
            .filter(|p| found.contains_key(p))
            .collect();
        println!(
            "{name}: depth {depth}, {} states ({} unique), {:.1}s, {}",
            checker.state_count(),
            checker.unique_state_count(),
            started.elapsed().as_secs_f64(),
            if broken.is_empty() {
                "no counterexample".to_owned()
            } else {
                format!("COUNTEREXAMPLE to {broken:?}")
            }
        );
        for property in broken {
            if let Some(path) = found.get(property) {
                println!("  {property}:");
                for action in path.clone().into_actions() {
                    println!("    {action:?}");
                }
            }
        }
        failed |= !checker
            .discoveries()
            .keys()
            .all(|p| !authd_model::properties::SAFETY.contains(p));
        let _ = checker.model();
    }
    if failed {
        std::process::exit(1);
    }
}
