//! Puts the memory layout where cortex-m-rt's `link.x` finds it (as `memory.x` in OUT_DIR),
//! and rebuilds when it changes: `nucleo-f429zi.x` (the NUCLEO-F429ZI, with the configuration
//! sector left out), or the file named by `FLEETBEAT_MEMORY_X` (`stack.sh` links for QEMU's
//! 128 KiB STM32F405 with it). No `memory.x` in this directory: the linker would take that
//! one first.

use std::path::PathBuf;
use std::{env, fs};

fn main() {
    let out = PathBuf::from(env::var_os("OUT_DIR").unwrap_or_default());
    let layout =
        env::var_os("FLEETBEAT_MEMORY_X").map_or_else(|| "nucleo-f429zi.x".into(), PathBuf::from);
    if let Err(err) = fs::copy(&layout, out.join("memory.x")) {
        panic!(
            "cannot copy {} to {}: {err}",
            layout.display(),
            out.display()
        );
    }
    println!("cargo:rustc-link-search={}", out.display());
    println!("cargo:rerun-if-changed={}", layout.display());
    println!("cargo:rerun-if-env-changed=FLEETBEAT_MEMORY_X");
    println!("cargo:rerun-if-changed=build.rs");
}
