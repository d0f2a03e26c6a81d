//! The source's own rules, read from `src/`: Redis is spoken only in `broker/`.

use std::path::{Path, PathBuf};

/// Every `.rs` file under `src/`, with its path relative to `src/` and its text.
fn sources() -> Vec<(String, String)> {
    let src = src();
    let mut files = Vec::new();
    let mut dirs: Vec<PathBuf> = vec![src.clone()];
    while let Some(d) = dirs.pop() {
        for entry in std::fs::read_dir(&d).expect("src/ is readable") {
            let path = entry.expect("src/ is readable").path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&path).expect("a source file is readable");
                let name = path.strip_prefix(&src).expect("under src/").display().to_string();
                files.push((name, text));
            }
        }
    }
    files.sort();
    files
}

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// The names of the `jobMatching` library's functions, from the library itself.
fn function_names() -> Vec<String> {
    let lua = std::fs::read_to_string(src().join("broker/job_matching.lua")).expect("the library is readable");
    lua.lines()
        .filter_map(|l| l.trim().strip_prefix("redis.register_function"))
        .filter_map(|rest| rest.split('\'').nth(1).map(str::to_owned))
        .collect()
}

#[test]
fn redis_is_spoken_only_in_the_broker() {
    let names = function_names();
    assert!(names.len() > 10, "the library's functions are found: {names:?}");
    let commands = [
        "redis::cmd",
        "redis::pipe",
        "redis::Client",
        "query_async",
        "get_multiplexed",
    ];
    let mut found = Vec::new();
    for (file, text) in sources() {
        if file.starts_with("broker/") {
            continue;
        }
        for (n, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap_or_default();
            for c in &commands {
                if code.contains(c) {
                    found.push(format!("src/{file}:{}: `{c}`", n + 1));
                }
            }
            for name in &names {
                if code.contains(&format!("\"{name}\"")) {
                    found.push(format!("src/{file}:{}: the library function `{name}`", n + 1));
                }
            }
        }
    }
    assert!(
        found.is_empty(),
        "Redis is spoken outside src/broker/ (the broker offers a typed call instead):\n{}",
        found.join("\n")
    );
}
