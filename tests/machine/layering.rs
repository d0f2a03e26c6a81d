//! The source's own rules, read from `src/`: Redis is spoken only in `broker/`, and the
//! top-level modules form layers in the order docs/architecture.md's layout block lists them
//! (top layer first): a module imports only those below it, so no two import each other.

use std::collections::{BTreeMap, BTreeSet};
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

/// The one import allowed to point up the layers, `(from, to, why)`. At most one may be listed,
/// and only with its reason.
const UPWARD_EXCEPTIONS: &[(&str, &str, &str)] = &[];

/// The top-level modules in the order docs/architecture.md's layout block (its first fenced
/// block) lists them: each line that starts at the margin with `name/` or `name.rs` is one,
/// the top layer first; indented lines are sub-modules.
fn layers() -> Vec<String> {
    let doc = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/architecture.md");
    let doc = std::fs::read_to_string(doc).expect("docs/architecture.md is readable");
    let block = doc
        .split("```")
        .nth(1)
        .expect("docs/architecture.md has a layout block");
    block
        .lines()
        .filter(|l| !l.starts_with(char::is_whitespace))
        .filter_map(|l| l.split_whitespace().next())
        .filter_map(|entry| entry.strip_suffix('/').or_else(|| entry.strip_suffix(".rs")))
        .map(str::to_owned)
        .collect()
}

/// The top-level module a file under `src/` belongs to: the first segment of its path.
fn top_level(file: &str) -> &str {
    let first = file.split('/').next().unwrap_or(file);
    first.strip_suffix(".rs").unwrap_or(first)
}

/// `text` with comments, string and character literals blanked (newlines kept), so only code
/// is searched. Test modules are kept: a test is held to the same layers.
fn code_only(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    let blank = |c: char| if c == '\n' { '\n' } else { ' ' };
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        if c == '/' && next == Some('/') {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c == '/' && next == Some('*') {
            i += 2;
            while i < chars.len() && !(chars[i] == '*' && chars.get(i + 1) == Some(&'/')) {
                out.push(blank(chars[i]));
                i += 1;
            }
            i += 2;
        } else if c == '"' || (c == 'r' && matches!(next, Some('"' | '#')) && !ident(chars.get(i.wrapping_sub(1)))) {
            // A string, or a raw string `r#"..."#` ended by a quote and as many `#`.
            let raw = c == 'r';
            let mut hashes = 0;
            if raw {
                i += 1;
                while chars.get(i) == Some(&'#') {
                    hashes += 1;
                    i += 1;
                }
                if chars.get(i) != Some(&'"') {
                    out.push('r');
                    continue;
                }
            }
            i += 1;
            while i < chars.len() {
                if !raw && chars[i] == '\\' {
                    i += 2;
                    continue;
                }
                if chars[i] == '"' && (0..hashes).all(|h| chars.get(i + 1 + h) == Some(&'#')) {
                    i += 1 + hashes;
                    break;
                }
                out.push(blank(chars[i]));
                i += 1;
            }
            out.push_str("\"\"");
        } else if c == '\'' && next == Some('\\') {
            // An escaped character literal: up to its closing quote.
            i += 2;
            while i < chars.len() && chars[i] != '\'' {
                i += 1;
            }
            i += 1;
        } else if c == '\'' && chars.get(i + 2) == Some(&'\'') {
            i += 3;
        } else {
            out.push(c);
            i += 1;
        }
    }
    out
}

fn ident(c: Option<&char>) -> bool {
    c.is_some_and(|c| c.is_alphanumeric() || *c == '_')
}

/// The top-level modules a piece of code names through `crate::`: `crate::x::...`, and each
/// item of a group `crate::{x, y::{...}}`, each with the line it is on.
fn crate_imports(code: &str) -> Vec<(String, usize)> {
    let mut found = Vec::new();
    for (at, _) in code.match_indices("crate::") {
        if ident(code[..at].chars().next_back().as_ref()) {
            continue;
        }
        let line = code[..at].matches('\n').count() + 1;
        let rest = &code[at + "crate::".len()..];
        let names: Vec<&str> = match rest.strip_prefix('{') {
            Some(group) => {
                let mut depth = 0;
                let end = group
                    .char_indices()
                    .find(|&(_, c)| {
                        depth += match c {
                            '{' => 1,
                            '}' => -1,
                            _ => 0,
                        };
                        depth < 0
                    })
                    .map_or(group.len(), |(i, _)| i);
                let mut items = Vec::new();
                let mut depth = 0;
                let mut start = 0;
                for (i, c) in group[..end].char_indices() {
                    match c {
                        '{' => depth += 1,
                        '}' => depth -= 1,
                        ',' if depth == 0 => {
                            items.push(&group[start..i]);
                            start = i + 1;
                        }
                        _ => {}
                    }
                }
                items.push(&group[start..end]);
                items
            }
            None => vec![rest],
        };
        for name in names {
            let name = name.trim_start();
            let len = name
                .find(|c: char| !(c.is_alphanumeric() || c == '_'))
                .unwrap_or(name.len());
            if len > 0 && &name[..len] != "self" {
                found.push((name[..len].to_owned(), line));
            }
        }
    }
    found
}

/// Every import of one top-level module by another: `(from, to)` to the places it is made.
fn imports() -> BTreeMap<(String, String), Vec<String>> {
    let mut edges: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
    for (file, text) in sources() {
        let from = top_level(&file);
        for (to, line) in crate_imports(&code_only(&text)) {
            if to != from {
                edges
                    .entry((from.to_owned(), to))
                    .or_default()
                    .push(format!("src/{file}:{line}"));
            }
        }
    }
    edges
}

#[test]
fn the_layout_block_lists_every_top_level_module_once() {
    let layers = layers();
    let listed: BTreeSet<&str> = layers.iter().map(String::as_str).collect();
    assert_eq!(listed.len(), layers.len(), "a module is listed twice: {layers:?}");
    let on_disk: BTreeSet<String> = std::fs::read_dir(src())
        .expect("src/ is readable")
        .map(|e| e.expect("src/ is readable").file_name().to_string_lossy().into_owned())
        .filter(|n| n != "lib.rs")
        .map(|n| top_level(&n).to_owned())
        .collect();
    let on_disk: BTreeSet<&str> = on_disk.iter().map(String::as_str).collect();
    assert_eq!(
        listed, on_disk,
        "docs/architecture.md's layout block and src/ list different top-level modules"
    );
}

#[test]
fn no_module_imports_one_above_it_or_one_that_imports_it() {
    assert!(UPWARD_EXCEPTIONS.len() <= 1, "at most one exception to the layers");
    let layers = layers();
    let rank = |m: &str| layers.iter().position(|l| l == m);
    let edges = imports();
    assert!(edges.len() > 20, "the imports are found: {edges:?}");
    let mut circles = Vec::new();
    let mut upward = Vec::new();
    for ((from, to), places) in &edges {
        if from < to && edges.contains_key(&(to.clone(), from.clone())) {
            let back = &edges[&(to.clone(), from.clone())];
            circles.push(format!(
                "{from} <-> {to}: {from} -> {to} at {}; {to} -> {from} at {}",
                places.join(", "),
                back.join(", ")
            ));
        }
        let excepted = UPWARD_EXCEPTIONS.iter().any(|(f, t, _)| f == from && t == to);
        match (rank(from), rank(to)) {
            (Some(f), Some(t)) if t < f && !excepted => {
                upward.push(format!("{from} -> {to} (above it) at {}", places.join(", ")))
            }
            (Some(_), Some(_)) => {}
            _ => upward.push(format!(
                "{from} -> {to}: not both in docs/architecture.md's layout block"
            )),
        }
    }
    assert!(
        circles.is_empty() && upward.is_empty(),
        "the layers of docs/architecture.md's layout block (top first: {}) are broken.\n\
         Modules that import each other:\n{}\nImports of a module above:\n{}",
        layers.join(", "),
        circles.join("\n"),
        upward.join("\n")
    );
}

#[test]
fn imports_are_read_from_code_only() {
    let code = code_only(
        "use crate::{a, b::{c, d}, self};\n// crate::comment\nlet s = \"crate::string\";\n\
         let r = r#\"crate::raw\"#; let c = '\"'; f(crate::e::g);\n/* crate::block */",
    );
    let names: Vec<(String, usize)> = crate_imports(&code);
    let names: Vec<(&str, usize)> = names.iter().map(|(n, l)| (n.as_str(), *l)).collect();
    assert_eq!(names, [("a", 1), ("b", 1), ("e", 4)]);
}

/// The module path of a file under `src/` (`cli/args.rs` is `cli::args`, `cli/mod.rs` is
/// `cli`); `None` for the crate roots.
fn module_of(file: &str) -> Option<Vec<String>> {
    let path = file.strip_suffix(".rs")?;
    let mut segments: Vec<String> = path.split('/').map(str::to_owned).collect();
    if segments.last().is_some_and(|s| s == "mod") {
        segments.pop();
    }
    (!segments.is_empty() && segments != ["lib"] && segments != ["main"]).then_some(segments)
}

/// Every path of a piece of code that starts at `crate::`, `super::` or `self::`, resolved
/// against the module `here` to the modules it names (each item of a `{...}` group its own).
fn module_paths(code: &str, here: &[String]) -> Vec<Vec<String>> {
    let mut found = Vec::new();
    for start in ["crate::", "super::", "self::"] {
        for (at, _) in code.match_indices(start) {
            if ident(code[..at].chars().next_back().as_ref()) || code[..at].ends_with("::") {
                continue;
            }
            let mut base: Vec<String> = match start {
                "crate::" => Vec::new(),
                "super::" => here[..here.len().saturating_sub(1)].to_vec(),
                _ => here.to_vec(),
            };
            let mut rest = &code[at + start.len()..];
            while let Some(r) = rest.strip_prefix("super::") {
                base.pop();
                rest = r;
            }
            let items: Vec<&str> = match rest.strip_prefix('{') {
                Some(group) => group
                    .split([',', '}'])
                    .map(str::trim_start)
                    .take_while(|s| !s.is_empty())
                    .collect(),
                None => vec![rest],
            };
            for item in items {
                let mut path = base.clone();
                for segment in item.split("::") {
                    let len = segment
                        .find(|c: char| !(c.is_alphanumeric() || c == '_'))
                        .unwrap_or(segment.len());
                    if len == 0 {
                        break;
                    }
                    path.push(segment[..len].to_owned());
                    if len < segment.len() {
                        break;
                    }
                }
                found.push(path);
            }
        }
    }
    found
}

/// Within each folder, at every depth, no files import each other, directly or round a circle:
/// what the top-level layers ask of the subsystems, asked of the files of each one.
#[test]
fn no_files_of_a_folder_import_each_other() {
    let files = sources();
    let modules: BTreeSet<Vec<String>> = files.iter().filter_map(|(f, _)| module_of(f)).collect();
    let mut edges: BTreeMap<Vec<String>, BTreeSet<Vec<String>>> = BTreeMap::new();
    for (file, text) in &files {
        let Some(here) = module_of(file) else { continue };
        // A file's own tests may use its siblings (a loader's test loads).
        let text = text.split("#[cfg(test)]\nmod tests").next().unwrap_or(text);
        for path in module_paths(&code_only(text), &here) {
            // The module the path names: its longest prefix that is a file.
            let Some(target) = (1..=path.len())
                .rev()
                .map(|n| path[..n].to_vec())
                .find(|p| modules.contains(p))
            else {
                continue;
            };
            let common = here.iter().zip(&target).take_while(|(a, b)| a == b).count();
            if common == here.len() || common == target.len() {
                continue; // a module and its own parent or child
            }
            edges
                .entry(here[..=common].to_vec())
                .or_default()
                .insert(target[..=common].to_vec());
        }
    }
    let reaches = |from: &Vec<String>, to: &Vec<String>| {
        let mut seen = BTreeSet::new();
        let mut todo = vec![from.clone()];
        while let Some(m) = todo.pop() {
            if &m == to {
                return true;
            }
            if seen.insert(m.clone()) {
                todo.extend(edges.get(&m).into_iter().flatten().cloned());
            }
        }
        false
    };
    let mut circles = Vec::new();
    for (from, tos) in &edges {
        for to in tos {
            if reaches(to, from) {
                circles.push(format!("{} -> {}", from.join("::"), to.join("::")));
            }
        }
    }
    assert!(edges.len() > 50, "the imports are found: {edges:?}");
    assert!(circles.is_empty(), "imports on a circle:\n{}", circles.join("\n"));
}
