//! `containerd-shim-runc-architect-v1`: the containerd shim v2 of runc-architect.
//!
//! One binary, three roles, chosen by its arguments:
//! - containerd's bootstrap commands (`start`, `delete`, `-info`) and the long-running
//!   shim server (the `containerd-shim` crate's runtime drives these);
//! - the single-threaded libcontainer helper ([`runc_architect_runtime::helper`]),
//!   selected before any thread exists;
//! - `-v`, the version.
//!
//! Layout: [`service`] (bootstrap and grouping), [`task`] (the task API), [`events`],
//! [`options`] (runtime options from containerd), [`checkpoint`] (checkpoint/restore
//! requests), [`logging`], [`info`] (`-info`).

mod checkpoint;
mod events;
mod hibernate;
mod info;
mod logging;
mod options;
mod service;
mod store;
mod task;
mod trim;

/// The runtime type containerd knows us by.
const RUNTIME_ID: &str = "io.containerd.runc-architect.v1";

fn main() {
    // First, before tokio or anything else starts a thread: libcontainer's clone must
    // happen in a single-threaded process.
    if let Some(code) = runc_architect_runtime::helper::run_if_helper() {
        std::process::exit(code);
    }
    if std::env::args()
        .skip(1)
        .any(|a| a == "-v" || a == "-version" || a == "--version")
    {
        println!("containerd-shim-runc-architect-v1:");
        println!("  Version:  {}", env!("CARGO_PKG_VERSION"));
        println!(
            "  Revision: {}",
            option_env!("RA_GIT_REVISION").unwrap_or("unknown")
        );
        println!("  Runtime:  {RUNTIME_ID} (libcontainer 0.7)");
        return;
    }
    if std::env::args()
        .skip(1)
        .any(|a| a == "-info" || a == "--info")
    {
        if let Err(e) = info::answer(RUNTIME_ID) {
            eprintln!("{RUNTIME_ID}: -info: {e}");
            std::process::exit(1);
        }
        return;
    }
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .max_blocking_threads(16)
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{RUNTIME_ID}: start tokio runtime: {e}");
            std::process::exit(1);
        }
    };
    let config = containerd_shim::Config {
        no_setup_logger: true,
        ..Default::default()
    };
    rt.block_on(containerd_shim::asynchronous::run::<service::Service>(
        RUNTIME_ID,
        Some(config),
    ));
}
