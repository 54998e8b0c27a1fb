use which::which;

/// Rebuild when bpf-linker changes: it links every eBPF object we produce.
fn main() {
    // `cargo xtask setup` installs it; without it the link step fails with a clear message.
    if let Ok(bpf_linker) = which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", bpf_linker.display());
    }
}
