//! The source tree keeps its shape: no file in `src/` over 600 lines, and no
//! import cycles between modules — neither between files (a module may use
//! what its ancestors define and re-export its children; every other use
//! counts) nor between the crate's top-level modules.

mod common;
use common::repo_root;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

const MAX_LINES: usize = 600;

/// Every `.rs` file under `dir`, relative to it.
fn rust_files(dir: &Path, rel: &Path, out: &mut Vec<std::path::PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    entries.sort();
    for p in entries {
        let name = p.file_name().unwrap().to_owned();
        if p.is_dir() {
            rust_files(&p, &rel.join(&name), out);
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(rel.join(name));
        }
    }
}

/// The module path of a file (`strategy/common/tp.rs` → strategy::common::tp).
fn module_of(file: &Path) -> Vec<String> {
    let mut parts: Vec<String> = file.iter().map(|s| s.to_string_lossy().into_owned()).collect();
    let last = parts.pop().unwrap();
    let stem = last.trim_end_matches(".rs");
    if stem != "mod" && stem != "lib" {
        parts.push(stem.to_string());
    }
    parts
}

/// The file's code without comments and without its test module.
fn code_of(text: &str) -> String {
    let mut out = String::new();
    let lines: Vec<&str> = text.lines().collect();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i].trim_start();
        if line.starts_with("#[cfg(test)]") && lines.get(i + 1).is_some_and(|n| n.trim_start().starts_with("mod tests {")) {
            break;
        }
        let code = match line.find("//") {
            Some(at) => &line[..at],
            None => line,
        };
        out.push_str(code);
        out.push('\n');
        i += 1;
    }
    out
}

/// Expands a `use` tree (`crate::{a::{B, C}, d}`) into paths.
fn expand_use(tree: &str) -> Vec<Vec<String>> {
    fn split_top(s: &str) -> Vec<String> {
        let (mut parts, mut depth, mut cur) = (Vec::new(), 0, String::new());
        for ch in s.chars() {
            match ch {
                '{' => depth += 1,
                '}' => depth -= 1,
                ',' if depth == 0 => {
                    parts.push(std::mem::take(&mut cur));
                    continue;
                }
                _ => {}
            }
            cur.push(ch);
        }
        parts.push(cur);
        parts.into_iter().map(|p| p.trim().to_string()).filter(|p| !p.is_empty()).collect()
    }
    let tree: String = tree.chars().filter(|c| !c.is_whitespace()).collect();
    let mut out = Vec::new();
    match tree.find('{') {
        None => out.push(tree.split(" as ").next().unwrap_or("").split("::").map(str::to_string).filter(|s| !s.is_empty()).collect()),
        Some(open) => {
            let prefix: Vec<String> = tree[..open].split("::").map(str::to_string).filter(|s| !s.is_empty()).collect();
            let inner = &tree[open + 1..tree.rfind('}').unwrap_or(tree.len())];
            for part in split_top(inner) {
                for mut rest in expand_use(&part) {
                    let mut p = prefix.clone();
                    p.append(&mut rest);
                    out.push(p);
                }
            }
        }
    }
    out
}

/// Every path a file's code names: `use` trees and inline `crate::`/`super::` paths.
fn paths_in(code: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    for stmt in code.split(';') {
        let s = stmt.trim();
        let s = s.strip_prefix("pub(crate) ").or_else(|| s.strip_prefix("pub ")).unwrap_or(s);
        if let Some(tree) = s.strip_prefix("use ") {
            out.extend(expand_use(tree));
        }
    }
    let bytes = code.as_bytes();
    for start in ["crate::", "super::"] {
        let mut from = 0;
        while let Some(at) = code[from..].find(start) {
            let at = from + at;
            from = at + start.len();
            if at > 0 && (bytes[at - 1].is_ascii_alphanumeric() || bytes[at - 1] == b'_' || bytes[at - 1] == b':') {
                continue;
            }
            let end = code[at..].find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':')).map_or(code.len(), |e| at + e);
            out.push(code[at..end].split("::").map(str::to_string).filter(|s| !s.is_empty()).collect());
        }
    }
    out
}

/// The module a path refers to, from module `me`: the deepest existing prefix.
fn resolve(me: &[String], is_folder_module: bool, path: &[String], modules: &BTreeSet<Vec<String>>) -> Option<Vec<String>> {
    let mut base: Vec<String> = Vec::new();
    let mut rest = path;
    match path.first().map(String::as_str) {
        Some("crate") => rest = &path[1..],
        Some("super") | Some("self") => {
            base = me.to_vec();
            while let Some(seg) = rest.first() {
                match seg.as_str() {
                    "super" => {
                        base.pop();
                        rest = &rest[1..];
                    }
                    "self" => rest = &rest[1..],
                    _ => break,
                }
            }
            let _ = is_folder_module;
        }
        Some(first) => {
            // A path relative to this module: only its children are meant.
            let mut child = me.to_vec();
            child.push(first.to_string());
            if !modules.contains(&child) {
                return None;
            }
            base = me.to_vec();
        }
        None => return None,
    }
    let mut best = None;
    let mut cur = base;
    if modules.contains(&cur) {
        best = Some(cur.clone());
    }
    for seg in rest {
        cur.push(seg.clone());
        if modules.contains(&cur) {
            best = Some(cur.clone());
        } else {
            break;
        }
    }
    best
}

fn is_ancestor(a: &[String], b: &[String]) -> bool {
    a.len() <= b.len() && b[..a.len()] == *a
}

/// Strongly connected components of more than one node (Tarjan).
fn cycles<N: Ord + Clone>(edges: &BTreeMap<N, BTreeSet<N>>) -> Vec<Vec<N>> {
    struct State<N> {
        index: BTreeMap<N, usize>,
        low: BTreeMap<N, usize>,
        stack: Vec<N>,
        on: BTreeSet<N>,
        next: usize,
        out: Vec<Vec<N>>,
    }
    fn visit<N: Ord + Clone>(v: &N, edges: &BTreeMap<N, BTreeSet<N>>, st: &mut State<N>) {
        st.index.insert(v.clone(), st.next);
        st.low.insert(v.clone(), st.next);
        st.next += 1;
        st.stack.push(v.clone());
        st.on.insert(v.clone());
        for w in edges.get(v).into_iter().flatten() {
            if !st.index.contains_key(w) {
                visit(w, edges, st);
                let lw = st.low[w];
                let lv = st.low.get_mut(v).unwrap();
                *lv = (*lv).min(lw);
            } else if st.on.contains(w) {
                let iw = st.index[w];
                let lv = st.low.get_mut(v).unwrap();
                *lv = (*lv).min(iw);
            }
        }
        if st.low[v] == st.index[v] {
            let mut comp = Vec::new();
            loop {
                let w = st.stack.pop().unwrap();
                st.on.remove(&w);
                comp.push(w.clone());
                if w == *v {
                    break;
                }
            }
            if comp.len() > 1 {
                st.out.push(comp);
            }
        }
    }
    let mut st = State { index: BTreeMap::new(), low: BTreeMap::new(), stack: Vec::new(), on: BTreeSet::new(), next: 0, out: Vec::new() };
    let nodes: BTreeSet<N> = edges.keys().cloned().chain(edges.values().flatten().cloned()).collect();
    for v in &nodes {
        if !st.index.contains_key(v) {
            visit(v, edges, &mut st);
        }
    }
    st.out
}

/// Which nodes each node uses.
type Graph<N> = BTreeMap<N, BTreeSet<N>>;

/// The file-level (module paths) and top-level use graphs of `src/`.
fn graphs() -> (Graph<Vec<String>>, Graph<String>) {
    let src = repo_root().join("src");
    let mut files = Vec::new();
    rust_files(&src, Path::new(""), &mut files);
    files.retain(|f| f != Path::new("main.rs") && f.file_name().is_some_and(|n| n != "tests.rs"));
    let modules: BTreeSet<Vec<String>> = files.iter().map(|f| module_of(f)).collect();
    let mut file_edges: Graph<Vec<String>> = BTreeMap::new();
    let mut top_edges: Graph<String> = BTreeMap::new();
    for f in &files {
        let me = module_of(f);
        let folder = f.file_name().is_some_and(|n| n == "mod.rs" || n == "lib.rs");
        let code = code_of(&std::fs::read_to_string(src.join(f)).unwrap());
        for path in paths_in(&code) {
            let Some(target) = resolve(&me, folder, &path, &modules) else { continue };
            if target.is_empty() || is_ancestor(&target, &me) || is_ancestor(&me, &target) {
                continue;
            }
            file_edges.entry(me.clone()).or_default().insert(target.clone());
            if let (Some(a), Some(b)) = (me.first(), target.first()) {
                if a != b {
                    top_edges.entry(a.clone()).or_default().insert(b.clone());
                }
            }
        }
    }
    (file_edges, top_edges)
}

#[test]
fn no_source_file_is_longer_than_600_lines() {
    let src = repo_root().join("src");
    let mut files = Vec::new();
    rust_files(&src, Path::new(""), &mut files);
    let long: Vec<String> = files
        .iter()
        .filter_map(|f| {
            let n = std::fs::read_to_string(src.join(f)).unwrap().lines().count();
            (n > MAX_LINES).then(|| format!("src/{} has {n} lines", f.display()))
        })
        .collect();
    assert!(long.is_empty(), "over {MAX_LINES} lines:\n{}", long.join("\n"));
}

#[test]
fn modules_use_each_other_without_cycles() {
    let (files, top) = graphs();
    assert!(files.values().map(BTreeSet::len).sum::<usize>() > 50, "the use graph looks empty: the parser found too few edges");
    let file_cycles: Vec<String> = cycles(&files).into_iter().map(|c| c.iter().map(|m| m.join("::")).collect::<Vec<_>>().join(" <-> ")).collect();
    assert!(file_cycles.is_empty(), "modules that use each other:\n{}", file_cycles.join("\n"));
    let top_cycles: Vec<String> = cycles(&top).into_iter().map(|c| c.join(" <-> ")).collect();
    assert!(top_cycles.is_empty(), "top-level modules that use each other:\n{}", top_cycles.join("\n"));
}

#[test]
fn the_cycle_finder_finds_a_cycle_and_the_use_parser_expands_trees() {
    let mut g: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    g.entry("spec").or_default().insert("memory");
    g.entry("memory").or_default().insert("strategy");
    g.entry("strategy").or_default().insert("spec");
    g.entry("runner").or_default().insert("spec");
    let found = cycles(&g);
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].iter().copied().collect::<BTreeSet<_>>(), ["memory", "spec", "strategy"].into_iter().collect());
    let paths = expand_use("crate::{backend::{Backend, RowRun}, comm::Comm}");
    assert_eq!(paths, vec![vec!["crate", "backend", "Backend"], vec!["crate", "backend", "RowRun"], vec!["crate", "comm", "Comm"]]);
    let code = code_of("use super::x::Y;\nfn f() { crate::results::utc_now(); } // crate::spec::Z\n#[cfg(test)]\nmod tests {\n use crate::runner::X;\n}\n");
    let found: Vec<String> = paths_in(&code).into_iter().map(|p| p.join("::")).collect();
    assert!(found.contains(&"super::x::Y".to_string()) && found.contains(&"crate::results::utc_now".to_string()), "{found:?}");
    assert!(!found.iter().any(|p| p.contains("spec") || p.contains("runner")), "comments and tests count: {found:?}");
}
