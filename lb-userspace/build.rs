//! Builds the XDP objects (crate lb-ebpf: binaries `lb` and `lb-tools`) for the BPF target with the
//! nightly toolchain `rust-toolchain-bpf.toml` pins and bpf-linker (`cargo xtask setup` installs
//! both) and leaves them in OUT_DIR,
//! where `src/dataplane.rs` embeds them. We do not use aya-build because it fixes RUSTFLAGS, and the
//! data path needs `-C target-cpu=v3`: the rate limiter's compare-and-swap is a v3 instruction.
use std::{env, fs, path::PathBuf, process::Command};

const OBJECTS: [&str; 2] = ["lb", "lb-tools"];

fn main() {
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let root = manifest.parent().expect("workspace root").to_path_buf();
    // The workspace manifest and lock file pin the data path's dependencies (aya-ebpf, ...):
    // a bump there must rebuild the object too.
    for dir in [
        "lb-ebpf/src",
        "lb-ebpf/Cargo.toml",
        "lb-common/src",
        "lb-common/Cargo.toml",
        "Cargo.toml",
        "Cargo.lock",
        "rust-toolchain-bpf.toml",
    ] {
        println!("cargo:rerun-if-changed={}", root.join(dir).display());
    }
    // For tools that only need the host code to type-check (rustdoc, clippy without nightly).
    println!("cargo:rerun-if-env-changed=LB_EBPF_SKIP");
    if env::var_os("LB_EBPF_SKIP").is_some() {
        for name in OBJECTS {
            fs::write(out_dir.join(name), []).expect("write placeholder object");
        }
        return;
    }

    let arch = env::var("CARGO_CFG_TARGET_ARCH").expect("CARGO_CFG_TARGET_ARCH");
    let target_dir = out_dir.join("ebpf-target");
    let rustflags = [
        &format!("--cfg=bpf_target_arch=\"{arch}\""),
        "-Cdebuginfo=2",
        "-Clink-arg=--btf",
        "-Ctarget-cpu=v3",
        // No memset/memmove loops linked in: where LLVM cannot expand one inline, the build
        // fails and the code gets fixed, instead of the verifier walking a byte loop.
        "-Clink-arg=--disable-memory-builtins",
    ]
    .join("\x1f");
    let toolchain = bpf_toolchain(&root);
    let mut cmd = Command::new("rustup");
    cmd.args([
        "run",
        &toolchain,
        "cargo",
        "build",
        "--package",
        "lb-ebpf",
        "--bins",
        "--release",
    ])
    .args([
        "--target",
        "bpfel-unknown-none",
        "-Z",
        "build-std=core",
        "--target-dir",
    ])
    .arg(&target_dir)
    .current_dir(&root)
    .env("CARGO_ENCODED_RUSTFLAGS", rustflags)
    // The outer cargo's compiler settings belong to the host build.
    .env_remove("RUSTC")
    .env_remove("RUSTC_WORKSPACE_WRAPPER")
    .env_remove("RUSTFLAGS");
    let status = cmd.status().unwrap_or_else(|e| {
        panic!("cannot run `rustup run {toolchain} cargo` to build lb-ebpf ({e}); run `cargo xtask setup` first")
    });
    assert!(
        status.success(),
        "building lb-ebpf failed ({status}); if nightly, rust-src or bpf-linker is missing, run `cargo xtask setup`"
    );
    for name in OBJECTS {
        let built = target_dir.join("bpfel-unknown-none/release").join(name);
        fs::copy(&built, out_dir.join(name))
            .unwrap_or_else(|e| panic!("copy {}: {e}", built.display()));
    }
}

/// The rustup toolchain that is the nightly `rust-toolchain-bpf.toml` pins: that channel if it is
/// installed, else a plain `nightly` of the same build date (how `cargo xtask setup` finds it).
fn bpf_toolchain(root: &std::path::Path) -> String {
    let pin = fs::read_to_string(root.join("rust-toolchain-bpf.toml"))
        .expect("rust-toolchain-bpf.toml at the workspace root");
    let channel = pin
        .lines()
        .find_map(|l| l.trim().strip_prefix("channel = \""))
        .and_then(|rest| rest.strip_suffix('"'))
        .expect("rust-toolchain-bpf.toml: channel = \"nightly-YYYY-MM-DD\"")
        .to_string();
    let out = |args: &[&str]| {
        Command::new("rustup")
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
    };
    if out(&["toolchain", "list"])
        .is_some_and(|l| l.lines().any(|t| t.starts_with(&format!("{channel}-"))))
    {
        return channel;
    }
    let same_build = channel.strip_prefix("nightly-").is_some_and(|date| {
        out(&["run", "nightly", "rustc", "--print", "sysroot"])
            .and_then(|sysroot| {
                fs::read_to_string(
                    PathBuf::from(sysroot.trim())
                        .join("lib/rustlib/multirust-channel-manifest.toml"),
                )
                .ok()
            })
            .is_some_and(|m| m.lines().any(|l| l.trim() == format!("date = \"{date}\"")))
    });
    if same_build {
        return "nightly".to_string();
    }
    panic!(
        "the {channel} toolchain (rust-toolchain-bpf.toml) is not installed: run `cargo xtask setup`"
    )
}
