//! The follower's reader (`store::follow`), checked on its own: every completed pass read every row
//! committed before it began, and without the in-flight allowance on gaps one does not.
use authd_model::reader::{self, Action, COMPLETE, Reader};
use stateright::{Checker, HasDiscoveries, Model};

fn reader(ids: u8, batch: u8, gaps_without_allowance: bool) -> Reader {
    Reader {
        ids,
        batch,
        gaps_without_allowance,
    }
}

#[test]
fn every_completed_pass_read_what_was_committed_before_it() {
    for batch in [1, 2] {
        let checker = reader(5, batch, false)
            .checker()
            .threads(2)
            .target_max_depth(24)
            .spawn_bfs()
            .join();
        eprintln!(
            "reader, batch {batch}: {} states ({} unique)",
            checker.state_count(),
            checker.unique_state_count()
        );
        checker.assert_no_discovery(COMPLETE);
        assert!(checker.discovery("a gap is filled").is_some());
    }
}

#[test]
fn gaps_dropped_without_the_allowance_lose_a_row() {
    let checker = reader(3, 1, true)
        .checker()
        .threads(2)
        .target_max_depth(18)
        .finish_when(HasDiscoveries::AnyFailures)
        .spawn_bfs()
        .join();
    let path = checker
        .discovery(COMPLETE)
        .expect("a counterexample without the allowance");
    eprintln!("{:?}", path.into_actions());
}

#[test]
fn every_reader_action_names_a_function_that_exists() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for action in [Action::PassBegin, Action::PassGaps, Action::PassAbove] {
        let (file, function) = reader::origin(action).expect("named");
        let text = std::fs::read_to_string(root.join(file)).unwrap();
        assert!(
            text.contains(&format!("fn {function}(")),
            "{action:?} names {file}::{function}"
        );
    }
}
