//! The house rules of `src/`, checked on the source text so they cannot quietly erode: the module
//! graph has no cycles (between top-level modules, and between the rooms of `gpu/` and
//! `runtime/`), the invariants the README states as absences hold, and no source file grows past
//! the size at which it stops being one room.
//!
//! A module's dependencies are the `crate::…` paths and the `super::…` paths its files name
//! outside comments and outside their `#[cfg(test)] mod tests` (tests may reach anywhere).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Lines of code (not blank, not comments, not the test module) a source file may have.
const MAX_CODE_LINES: usize = 800;

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// One source file: its module path (`["gpu", "cpu", "matmul"]`) and its code without comments
/// and without the unit-test module.
struct Source {
    module: Vec<String>,
    path: PathBuf,
    code: String,
}

fn sources() -> Vec<Source> {
    let mut out = Vec::new();
    let mut stack = vec![src()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let rel = path.strip_prefix(src()).unwrap().with_extension("");
            let mut module: Vec<String> = rel.iter().map(|c| c.to_string_lossy().into_owned()).collect();
            let is_mod_file = module.last().is_some_and(|m| m == "mod");
            // Unit-test files of a module (`cpu/tests.rs`, `emu/tests.rs`) are tests.
            if module.last().is_some_and(|m| m == "tests") || module == ["lib"] || module == ["main"] {
                continue;
            }
            if is_mod_file {
                module.pop();
            }
            let text = std::fs::read_to_string(&path).unwrap();
            out.push(Source { module, path, code: strip(&text) });
        }
    }
    out
}

/// The text without the `#[cfg(test)] … mod tests` block (always the last item of a file here)
/// and without `//` comments.
fn strip(text: &str) -> String {
    let end = ["#[cfg(test)]\nmod tests", "#[cfg(test)]\npub(crate) mod tests"].iter().filter_map(|m| text.find(m)).min();
    let text = &text[..end.unwrap_or(text.len())];
    text.lines().filter(|l| !l.trim_start().starts_with("//")).collect::<Vec<_>>().join("\n")
}

/// Module paths a file names: `crate::a::b`, `use crate::{a, b::c}` and `super::…` (resolved
/// against the file's own module).
fn references(s: &Source) -> Vec<Vec<String>> {
    let mut refs = Vec::new();
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let path_at = |rest: &str| -> Vec<String> {
        let mut parts = Vec::new();
        let mut rest = rest;
        loop {
            let end = rest.find(|c: char| !ident(c)).unwrap_or(rest.len());
            let part = &rest[..end];
            if part.is_empty() || !part.starts_with(|c: char| c.is_ascii_lowercase()) {
                break;
            }
            parts.push(part.to_owned());
            match rest[end..].strip_prefix("::") {
                Some(r) => rest = r,
                None => break,
            }
        }
        parts
    };
    for (i, _) in s.code.match_indices("crate::") {
        if i > 0 && s.code[..i].ends_with(|c: char| ident(c)) {
            continue;
        }
        let rest = &s.code[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            for item in group.split('}').next().unwrap_or("").split(',') {
                let p = path_at(item.trim());
                if !p.is_empty() {
                    refs.push(p);
                }
            }
        } else {
            refs.push(path_at(rest));
        }
    }
    // `super::` from a `mod.rs` is the parent of its directory's module; from `x.rs`, the parent
    // of `x`: either way, the module minus one segment per `super`.
    for (i, _) in s.code.match_indices("super::") {
        if i > 0 && (s.code[..i].ends_with("super::") || s.code[..i].ends_with(|c: char| ident(c))) {
            continue;
        }
        let mut rest = &s.code[i..];
        let mut ups = 0;
        while let Some(r) = rest.strip_prefix("super::") {
            ups += 1;
            rest = r;
        }
        let Some(keep) = s.module.len().checked_sub(ups) else { continue };
        let mut p = s.module[..keep].to_vec();
        p.extend(path_at(rest));
        refs.push(p);
    }
    refs
}

/// The graph at one level: within `inside` (a module path prefix), each file's module is cut to
/// `inside.len() + 1` segments, and so is each reference into `inside`.
fn graph(sources: &[Source], inside: &[&str]) -> BTreeMap<String, BTreeSet<String>> {
    let depth = inside.len() + 1;
    let within = |m: &[String]| m.len() >= depth && m.iter().zip(inside).all(|(a, b)| a == b);
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for s in sources.iter().filter(|s| within(&s.module)) {
        let from = s.module[..depth].join("::");
        for r in references(s) {
            if within(&r) {
                let to = r[..depth].join("::");
                if to != from {
                    edges.entry(from.clone()).or_default().insert(to);
                }
            }
        }
    }
    edges
}

/// A cycle of `edges`, if there is one.
fn cycle(edges: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        v: &str,
        edges: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        state.insert(v.to_owned(), 1);
        path.push(v.to_owned());
        for w in edges.get(v).into_iter().flatten() {
            match state.get(w.as_str()) {
                Some(1) => {
                    let start = path.iter().position(|p| p == w).unwrap_or(0);
                    let mut c = path[start..].to_vec();
                    c.push(w.clone());
                    return Some(c);
                }
                Some(_) => {}
                None => {
                    if let Some(c) = visit(w, edges, state, path) {
                        return Some(c);
                    }
                }
            }
        }
        path.pop();
        state.insert(v.to_owned(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for v in edges.keys() {
        if !state.contains_key(v.as_str())
            && let Some(c) = visit(v, edges, &mut state, &mut Vec::new())
        {
            return Some(c);
        }
    }
    None
}

#[test]
fn the_module_graph_has_no_cycles() {
    let sources = sources();
    assert!(sources.len() > 50, "read the source tree ({} files)", sources.len());
    let top = graph(&sources, &[]);
    // The graph is real: known edges are seen.
    assert!(top["runtime"].contains("gpu") && top["daemon"].contains("jobs"), "{top:?}");
    for inside in [&[][..], &["gpu"][..], &["runtime"][..], &["runtime", "host"][..], &["runtime", "host", "gpu"][..]] {
        let edges = graph(&sources, inside);
        if let Some(c) = cycle(&edges) {
            panic!("import cycle inside {inside:?}: {}", c.join(" -> "));
        }
    }
}

#[test]
fn the_stated_absences_hold() {
    let sources = sources();
    let top = graph(&sources, &[]);
    let deps = |m: &str| top.get(m).cloned().unwrap_or_default();
    // gpu knows no Wasm, actor or network: of the crate it uses only the leaf `sync`.
    assert_eq!(deps("gpu"), BTreeSet::from(["sync".to_owned()]), "gpu imports");
    assert!(!deps("jobs").contains("daemon"), "jobs does not know the daemon");
    assert!(deps("metrics").is_empty(), "metrics knows no subsystem: {:?}", deps("metrics"));
    for lib in ["gpu", "runtime", "jobs", "model", "bench", "devnet", "journal", "protocol"] {
        for top_floor in ["cli", "demo", "daemon"] {
            assert!(!deps(lib).contains(top_floor), "{lib} imports {top_floor}");
        }
    }
    // Only runtime names wasmtime.
    for s in &sources {
        let names_wasmtime = s.code.contains("wasmtime::") || s.code.contains("use wasmtime");
        assert!(!names_wasmtime || s.module[0] == "runtime", "{} names wasmtime", s.path.display());
    }
    // The host binding plans nothing itself: no shape or dtype rule is called from it.
    for s in sources.iter().filter(|s| s.module.starts_with(&["runtime".to_owned(), "host".to_owned()])) {
        for rule in ["matmul_dims", "broadcast(", "check_param", "expect_dtype", "dtype_err", "_dims("] {
            assert!(!s.code.contains(rule), "{} applies the op rule `{rule}`", s.path.display());
        }
    }
    // Only the planner and the shape module apply operand rules; backends only read geometry.
    for s in sources.iter().filter(|s| s.module.first().is_some_and(|m| m == "gpu")) {
        let room = s.module.get(1).map(String::as_str).unwrap_or("");
        if !matches!(room, "op" | "shape" | "dtype" | "quant") {
            for rule in ["expect_dtype(", "dtype_err(", "check_param(", "matmul_dims(", "broadcast(", "_dims("] {
                assert!(!s.code.contains(rule), "{} applies the op rule `{rule}` (it belongs in gpu/op.rs)", s.path.display());
            }
        }
    }
}

#[test]
fn no_source_file_outgrows_one_room() {
    for s in sources() {
        let lines = s.code.lines().filter(|l| !l.trim().is_empty()).count();
        assert!(
            lines <= MAX_CODE_LINES,
            "{} has {lines} lines of code (more than {MAX_CODE_LINES}): split it along its concerns",
            s.path.display()
        );
    }
}
