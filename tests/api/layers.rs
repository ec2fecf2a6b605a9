//! The layers of `src/lib.rs`'s table hold: every `crate::` path in `src/` (comments aside) names
//! a module its own module may import, and the table itself has no circle.
use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

const SRC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/src");

/// The table of `src/lib.rs`: module → the modules it may import.
fn allowed() -> BTreeMap<String, BTreeSet<String>> {
    let lib = std::fs::read_to_string(Path::new(SRC).join("lib.rs")).unwrap();
    let names = |cell: &str| -> BTreeSet<String> {
        cell.split(',')
            .map(|n| n.trim().trim_matches('`').to_owned())
            .filter(|n| !n.is_empty())
            .collect()
    };
    lib.lines()
        .filter_map(|l| l.strip_prefix("//! | `"))
        .map(|row| {
            let cells: Vec<&str> = row.split('|').collect();
            let module = cells[0].trim().trim_matches('`').to_owned();
            (module, names(cells.get(1).copied().unwrap_or("")))
        })
        .collect()
}

/// Every `.rs` file under `dir`.
fn files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Code without comments and string literals (so that `"redis://…"` is not read as a comment).
fn code_only(code: &str) -> String {
    let mut out = String::with_capacity(code.len());
    let mut chars = code.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                // A string literal: skipped, escapes included.
                while let Some(c) = chars.next() {
                    match c {
                        '\\' => {
                            chars.next();
                        }
                        '"' => break,
                        _ => {}
                    }
                }
                out.push_str("\"\"");
            }
            // A char literal (`'"'`, `'\\''`), not a lifetime (`'a`).
            '\'' => {
                let mut ahead = chars.clone();
                let quoted = match ahead.next() {
                    Some('\\') => {
                        ahead.next();
                        ahead.next() == Some('\'')
                    }
                    Some(_) => ahead.next() == Some('\''),
                    None => false,
                };
                if quoted {
                    chars = ahead;
                    out.push_str("' '");
                } else {
                    out.push(c);
                }
            }
            '/' if chars.peek() == Some(&'/') => {
                for c in chars.by_ref() {
                    if c == '\n' {
                        out.push('\n');
                        break;
                    }
                }
            }
            _ => out.push(c),
        }
    }
    out
}

/// The top-level modules a file's code names: `crate::a::b`, `crate::{a, b::c}`, and `super::`
/// paths that climb to the crate root from a file `depth` modules down (`src/a.rs` and
/// `src/a/mod.rs` are 1 down, `src/a/b.rs` 2).
fn imports(code: &str, depth: usize, modules: &BTreeSet<String>) -> BTreeSet<String> {
    let code = code_only(code);
    let mut found = BTreeSet::new();
    let ident = |s: &str| -> String {
        s.trim_start()
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    let mut roots: Vec<usize> = code
        .match_indices("crate::")
        .map(|(at, _)| at + "crate::".len())
        .collect();
    // Only names of top-level modules: in an inline module (`mod tests`) `super::` climbs less.
    let climb = "super::".repeat(depth);
    roots.extend(
        code.match_indices(climb.as_str())
            .filter(|(at, _)| !code[..*at].ends_with("super::"))
            .map(|(at, _)| at + climb.len())
            .filter(|at| modules.contains(&ident(&code[*at..]))),
    );
    for at in roots {
        let rest = &code[at..];
        match rest.strip_prefix('{') {
            Some(group) => {
                // The group's own items: a comma at depth 0 starts the next one.
                let (mut nested, mut item_start) = (0, 0);
                for (i, c) in group.char_indices() {
                    match c {
                        '{' => nested += 1,
                        '}' if nested == 0 => {
                            found.insert(ident(&group[item_start..i]));
                            break;
                        }
                        '}' => nested -= 1,
                        ',' if nested == 0 => {
                            found.insert(ident(&group[item_start..i]));
                            item_start = i + 1;
                        }
                        _ => {}
                    }
                }
            }
            None => {
                found.insert(ident(rest));
            }
        }
    }
    found.remove("");
    found.remove("self");
    found.remove("super");
    found
}

#[test]
fn every_import_points_down() {
    let table = allowed();
    assert!(table.len() >= 15, "src/lib.rs lists the layers: {table:?}");
    let mut sources = Vec::new();
    files(Path::new(SRC), &mut sources);
    let modules: BTreeSet<String> = table.keys().cloned().collect();
    let mut wrong = Vec::new();
    let mut used = BTreeSet::new();
    for path in &sources {
        let relative = path.strip_prefix(SRC).unwrap();
        let module = relative
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy()
            .trim_end_matches(".rs")
            .to_owned();
        if module == "lib" || module == "main" {
            continue;
        }
        let Some(may) = table.get(&module) else {
            wrong.push(format!(
                "src/{}: module `{module}` is not in src/lib.rs's table",
                relative.display()
            ));
            continue;
        };
        let code = std::fs::read_to_string(path).unwrap();
        let parts = relative.components().count();
        let depth = if relative.ends_with("mod.rs") {
            parts - 1
        } else {
            parts
        };
        for import in imports(&code, depth, &modules) {
            if import == module {
                continue;
            }
            used.insert((module.clone(), import.clone()));
            if !may.contains(&import) {
                wrong.push(format!(
                    "src/{} imports crate::{import}, which `{module}` may not use",
                    relative.display()
                ));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "imports that do not point down:\n{}",
        wrong.join("\n")
    );
    // The table is a picture of the code, not a ceiling: every arrow it allows is used.
    let unused: Vec<String> = table
        .iter()
        .flat_map(|(m, uses)| uses.iter().map(move |u| (m.clone(), u.clone())))
        .filter(|edge| !used.contains(edge))
        .map(|(m, u)| format!("`{m}` → `{u}`"))
        .collect();
    assert!(
        unused.is_empty(),
        "src/lib.rs allows imports nothing makes: {unused:?}"
    );
}

#[test]
fn the_layers_have_no_circle() {
    let table = allowed();
    // Kahn: take modules that import nothing left; a circle leaves some behind.
    let mut left = table.clone();
    loop {
        let free: Vec<String> = left
            .iter()
            .filter(|(_, uses)| uses.iter().all(|u| !left.contains_key(u)))
            .map(|(m, _)| m.clone())
            .collect();
        if free.is_empty() {
            break;
        }
        for module in free {
            left.remove(&module);
        }
    }
    assert!(left.is_empty(), "a circle among {:?}", left.keys());
    for (module, uses) in &table {
        for used in uses {
            assert!(
                table.contains_key(used),
                "`{module}` may import `{used}`, which the table lacks"
            );
        }
    }
}

/// The reader finds what it must: an import that runs back up is named.
#[test]
fn an_import_back_up_is_found() {
    let code = "use crate::{\n    clock::Clock, // a clock\n    store::{self, Db},\n};\nfn f() { crate::grpc::status::chain(e); }\n// crate::jobs in a comment\nconst U: &str = \"redis://h\"; const Q: char = '\"'; use crate::local;\nuse super::super::health::Health;\nuse super::Sibling;\n";
    let modules = ["clock", "grpc", "health", "jobs", "local", "store"];
    let modules = modules.iter().map(|m| m.to_string()).collect();
    let found: Vec<String> = imports(code, 2, &modules).into_iter().collect();
    assert_eq!(found, ["clock", "grpc", "health", "local", "store"]);
}

/// Files fit in a head: none of `src/`, `tests/`, `benches/` or the model's is over 600 lines
/// (split by responsibility, as DESIGN asks).
#[test]
fn no_file_is_over_600_lines() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut sources = Vec::new();
    for dir in ["src", "tests", "benches", "model/src", "model/tests"] {
        files(&root.join(dir), &mut sources);
    }
    let long: Vec<String> = sources
        .iter()
        .filter_map(|path| {
            let lines = std::fs::read_to_string(path).unwrap().lines().count();
            (lines > 600).then(|| {
                format!(
                    "{} ({lines} lines)",
                    path.strip_prefix(root).unwrap().display()
                )
            })
        })
        .collect();
    assert!(long.is_empty(), "files over 600 lines: {long:?}");
}
