//! Puts `memory.x` (the flash and RAM layout, with the configuration sector left out) where
//! cortex-m-rt's `link.x` finds it, and rebuilds when it changes.

use std::path::PathBuf;
use std::{env, fs};

fn main() {
    let out = PathBuf::from(env::var_os("OUT_DIR").unwrap_or_default());
    if let Err(err) = fs::copy("memory.x", out.join("memory.x")) {
        panic!("cannot copy memory.x to {}: {err}", out.display());
    }
    println!("cargo:rustc-link-search={}", out.display());
    println!("cargo:rerun-if-changed=memory.x");
    println!("cargo:rerun-if-changed=build.rs");
}
