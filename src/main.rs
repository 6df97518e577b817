use mimalloc::MiMalloc;

/// mimalloc: measured 20–30% faster than glibc malloc on whole-model CPU inference (large,
/// short-lived activation buffers).
#[global_allocator]
static GLOBAL: MiMalloc = MiMalloc;

fn main() {
    // Die quietly on a closed pipe (`dydit flops --all | head`) like other Unix tools, instead
    // of panicking inside println!.
    #[cfg(unix)]
    // SAFETY: restoring the default disposition of SIGPIPE before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    std::process::exit(dydit::cli::main());
}
