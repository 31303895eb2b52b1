//! Finds the eBPF object that `cargo xtask build-ebpf` built, so the agent can embed it.
use std::{env, path::PathBuf};

fn main() {
    println!("cargo:rerun-if-env-changed=WATCHDOG_EBPF_OBJECT");
    let object = match env::var_os("WATCHDOG_EBPF_OBJECT") {
        Some(path) => PathBuf::from(path),
        None => PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"))
            .join("../target/bpfel-unknown-none/release/watchdog"),
    };
    println!("cargo:rerun-if-changed={}", object.display());
    if !object.is_file() {
        panic!(
            "\n\nThe eBPF object {} does not exist.\n\
             Build it first with `cargo xtask build-ebpf` (it installs the nightly toolchain \
             parts and bpf-linker it needs), or point WATCHDOG_EBPF_OBJECT at a built object.\n",
            object.display()
        );
    }
    let object = object.canonicalize().expect("object path resolves");
    println!("cargo:rustc-env=WATCHDOG_EBPF_OBJECT={}", object.display());
}
