//! Ctrl-C (SIGINT), SIGTERM and SIGHUP during `nvp train`: the first one asks the
//! training loop to stop after the current step and save its `last` checkpoint; a
//! second one ends the process at once (checkpoints are written atomically, so the
//! previous one stays whole).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};

/// Exit status of a run stopped by a signal (128 + SIGINT, the shells' convention).
pub const EXIT_INTERRUPTED: i32 = 130;

/// Set by the first signal.
#[derive(Clone)]
pub struct StopFlag(Arc<AtomicBool>);

impl StopFlag {
    pub fn is_set(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// Installs the handler (once per process).
pub fn install() -> Result<StopFlag> {
    let flag = Arc::new(AtomicBool::new(false));
    let seen = flag.clone();
    ctrlc::set_handler(move || {
        if seen.swap(true, Ordering::SeqCst) {
            eprintln!("\nsecond interrupt: quitting now (the last checkpoint on disk is intact)");
            std::process::exit(EXIT_INTERRUPTED);
        }
        eprintln!(
            "\ninterrupt: stopping after this step and saving the last checkpoint (interrupt again to quit at once)"
        );
    })
    .context("cannot install the interrupt handler")?;
    Ok(StopFlag(flag))
}

/// The error a training run stopped by a signal ends with (`main` exits with
/// [`EXIT_INTERRUPTED`] for it).
#[derive(Debug)]
pub struct Interrupted(pub String);

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Interrupted {}
