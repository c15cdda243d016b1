//! Builds the XDP objects (crate lb-ebpf: binaries `lb` and `lb-tools`) for the BPF target with the
//! nightly toolchain and bpf-linker (`cargo xtask setup` installs both) and leaves them in OUT_DIR,
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
    let mut cmd = Command::new("rustup");
    cmd.args([
        "run",
        "nightly",
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
        panic!("cannot run `rustup run nightly cargo` to build lb-ebpf ({e}); run `cargo xtask setup` first")
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
