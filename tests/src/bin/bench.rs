//! `cargo xtask bench NAME [-- ARGS...]`: benchmarks of the watchdog against the real kernel, in
//! network namespaces, with release builds (xtask sets `WATCHDOG_BIN`).
//!
//! Every benchmark is a module of `watchdog_tests::bench` with its options and a `main`; each
//! prints a table on stderr and exactly one JSON line on stdout. Needs root.

use std::process::ExitCode;

use clap::Parser;
use watchdog_tests::bench;

#[derive(Parser)]
#[command(
    name = "bench",
    about = "The watchdog's benchmarks (root; release builds)"
)]
enum Benchmark {
    /// Crash → reconnect time of a fixed-port client: kernel RFC 5961 recovery, destroy only,
    /// replay.
    Reconnect(bench::reconnect::Options),
    /// Data-path cost, with/without the watchdog interleaved: request/response, bulk, new
    /// connections.
    Overhead(bench::overhead::Args),
    /// 100k watched connections, a 1,000-client mass crash, a spoofed SYN flood: detection
    /// latency, recovery, agent RSS and CPU.
    Scale(bench::scale::Args),
}

fn main() -> ExitCode {
    let benchmark = Benchmark::parse();
    let (name, result) = match benchmark {
        Benchmark::Reconnect(options) => ("reconnect", bench::reconnect::main(options)),
        Benchmark::Overhead(args) => ("overhead", bench::overhead::main(args)),
        Benchmark::Scale(args) => ("scale", bench::scale::main(args)),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("bench {name}: {e:#}");
            ExitCode::from(2)
        }
    }
}
