//! `nvp` — the command-line face of the Real NVP crates.

mod checkpoint;
mod cli;
mod commands;
mod data;
mod engine;
mod interrupt;
mod model;
mod report;
mod settings;

use clap::Parser;

/// mimalloc reuses large buffers instead of returning them to the kernel:
/// 10–20 % faster convolution backward passes than glibc's malloc here.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `purge_delay` option (mimalloc 2.x option index).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Process-wide performance settings, before any candle op runs: keep freed
/// memory instead of returning it to the kernel (a training step reuses the
/// same buffer sizes; returned pages cost page faults and zeroing), and let
/// candle's idle worker threads park soon instead of spinning on the 2nd core.
fn tune_runtime() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: sets a global mimalloc option; no allocation invariant depends on it.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    }
    if std::env::var_os("RUST_LIB_BACKTRACE").is_none() {
        // Errors are reported as one clear line: candle must not capture and
        // print backtraces into them even when RUST_BACKTRACE is set.
        std::env::set_var("RUST_LIB_BACKTRACE", "0");
    }
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        // Single-threaded at this point: no other thread reads the environment.
        std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", "1000");
    }
}

/// The error and its causes on one line, `a: b: c`, leaving out a cause whose text
/// the line already ends with (errors that quote their source, as the data crate's
/// `"{path}: {io error}"`, would otherwise print it twice).
fn one_line(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let s = cause.to_string();
        if !out.is_empty() && out.ends_with(&s) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&s);
    }
    out
}

fn main() {
    tune_runtime();
    let cli = cli::Cli::parse();
    if let Err(e) = commands::run(cli.command) {
        eprintln!("error: {}", one_line(&e));
        if e.downcast_ref::<interrupt::Interrupted>().is_some() {
            std::process::exit(interrupt::EXIT_INTERRUPTED);
        }
        std::process::exit(1);
    }
}
