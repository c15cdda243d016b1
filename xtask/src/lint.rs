//! `cargo xtask lint`: what keeps the code as the project means it: rustfmt, clippy with the
//! workspace's lints on the host crates and on the data path for the BPF target (the host
//! build compiles lb-ebpf out, so nothing else ever lints it), every warning an error, and no
//! import cycle between the modules of a crate.
use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Result, bail};

use crate::{cargo, root, run, step};

/// Crates whose modules must not import each other in a circle.
const ACYCLIC: &[&str] = &["lb-userspace/src", "lb-common/src"];

pub fn lint() -> Result<()> {
    step("rustfmt --check");
    cargo(&["fmt", "--all", "--", "--check"])?;
    step("clippy: host crates");
    cargo(&[
        "clippy",
        "--workspace",
        "--exclude",
        "lb-ebpf",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ])?;
    step("clippy: lb-ebpf for the BPF target");
    clippy_bpf()?;
    step("import cycles");
    for dir in ACYCLIC {
        let graph = module_graph(&root().join(dir))?;
        if let Some(cycle) = find_cycle(&graph) {
            bail!(
                "{dir}: modules import each other in a circle: {}",
                cycle.join(" -> ")
            );
        }
        println!("{dir}: {} modules, no cycle", graph.len());
    }
    Ok(())
}

/// Clippy on the data path as lb-userspace's build script compiles it (nightly, core built for
/// the BPF target, the same cfg and CPU), in a target directory of its own.
fn clippy_bpf() -> Result<()> {
    let arch = std::env::consts::ARCH;
    let rustflags = [
        format!("--cfg=bpf_target_arch=\"{arch}\""),
        "-Ctarget-cpu=v3".to_string(),
    ]
    .join("\x1f");
    let mut cmd = Command::new("rustup");
    cmd.args([
        "run", "nightly", "cargo", "clippy", "-p", "lb-ebpf", "--bins",
    ])
    .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"])
    .arg("--target-dir")
    .arg(root().join("target/lint-bpf"))
    .args(["--", "-D", "warnings"])
    .current_dir(root())
    .env("CARGO_ENCODED_RUSTFLAGS", rustflags)
    .env_remove("RUSTC")
    .env_remove("RUSTC_WORKSPACE_WRAPPER")
    .env_remove("RUSTFLAGS");
    run(&mut cmd)
}

/// Top-level module -> the top-level modules it names as `crate::...` (a module's files and
/// its submodules' count as one: `super::` stays inside).
fn module_graph(src: &Path) -> Result<BTreeMap<String, BTreeSet<String>>> {
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in rust_files(src)? {
        let rel = file.strip_prefix(src)?;
        let top = rel
            .components()
            .next()
            .and_then(|c| c.as_os_str().to_str())
            .unwrap_or("")
            .trim_end_matches(".rs")
            .to_string();
        if top == "lib" || top == "main" {
            continue;
        }
        let text = std::fs::read_to_string(&file)?;
        let refs = graph.entry(top.clone()).or_default();
        for name in crate_refs(&text) {
            if name != top {
                refs.insert(name);
            }
        }
    }
    let modules: BTreeSet<String> = graph.keys().cloned().collect();
    for refs in graph.values_mut() {
        refs.retain(|r| modules.contains(r));
    }
    Ok(graph)
}

fn rust_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            out.extend(rust_files(&path)?);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    Ok(out)
}

/// The first path segment after every `crate::` in code (comments left out), including each
/// item of `crate::{a, b::c}`.
fn crate_refs(text: &str) -> BTreeSet<String> {
    let code: String = text
        .lines()
        .map(|l| l.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n");
    let ident = |s: &str| -> String {
        s.trim_start()
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    let mut refs = BTreeSet::new();
    for (i, _) in code.match_indices("crate::") {
        let rest = &code[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // Items at depth 0 of the group.
            let mut depth = 0;
            let mut item_start = true;
            for (j, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => item_start = true,
                    c if item_start && !c.is_whitespace() => {
                        item_start = false;
                        refs.insert(ident(&group[j..]));
                    }
                    _ => {}
                }
            }
        } else {
            refs.insert(ident(rest));
        }
    }
    refs.retain(|r| !r.is_empty() && r != "self");
    refs
}

/// A cycle in `graph`, as the modules along it (first repeated at the end), if there is one.
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|p| p == node) {
            let mut cycle = path[at..].to_vec();
            cycle.push(node.to_string());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_string());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(c) = visit(next, graph, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(node.to_string());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|n| visit(n, graph, &mut Vec::new(), &mut done))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crate_paths_and_groups_are_read() {
        let text = "use crate::{agent::Agent, k8s::{self, input::Target}, model};\n\
                    // crate::commented\n\
                    fn f() { crate::system::monotonic_ns(); }\n";
        let refs: Vec<String> = crate_refs(text).into_iter().collect();
        assert_eq!(refs, ["agent", "k8s", "model", "system"]);
    }

    #[test]
    fn a_cycle_is_found_and_named() {
        let graph: BTreeMap<String, BTreeSet<String>> = [
            ("agent", vec!["k8s", "model"]),
            ("k8s", vec!["model", "agent"]),
            ("model", vec![]),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.into_iter().map(String::from).collect()))
        .collect();
        assert_eq!(
            find_cycle(&graph),
            Some(vec!["agent".into(), "k8s".into(), "agent".into()])
        );
        let mut acyclic = graph.clone();
        acyclic.get_mut("k8s").unwrap().remove("agent");
        assert_eq!(find_cycle(&acyclic), None);
    }
}
