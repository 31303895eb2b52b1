//! `cargo xtask bench NAME [-- ARGS...]`: benchmarks of the watchdog against the real kernel, in
//! network namespaces, with release builds (xtask sets `WATCHDOG_BIN`).
//!
//! Every benchmark is a module of `watchdog_tests::bench` with a `main(args)`; each prints a
//! table on stderr and exactly one JSON line on stdout. Needs root.

use std::process::ExitCode;

use anyhow::Result;
use watchdog_tests::bench;

/// A benchmark: its name on the command line, what it measures, and its entry point.
struct Benchmark {
    name: &'static str,
    about: &'static str,
    main: fn(&[String]) -> Result<ExitCode>,
}

const BENCHMARKS: &[Benchmark] = &[
    Benchmark {
        name: "reconnect",
        about: "crash → reconnect time of a fixed-port client: kernel RFC 5961 recovery, \
                destroy only, replay",
        main: bench::reconnect::main,
    },
    Benchmark {
        name: "overhead",
        about: "data-path cost, with/without the watchdog interleaved: request/response, \
                bulk, new connections",
        main: bench::overhead::main,
    },
    Benchmark {
        name: "scale",
        about: "100k watched connections, a 1,000-client mass crash, a spoofed SYN flood: \
                detection latency, recovery, agent RSS and CPU",
        main: bench::scale::main,
    },
];

fn usage() -> String {
    let mut text = String::from("usage: bench NAME [ARGS...]\nbenchmarks:\n");
    for b in BENCHMARKS {
        text.push_str(&format!("  {:<10} {}\n", b.name, b.about));
    }
    text
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((name, rest)) = args.split_first() else {
        eprint!("{}", usage());
        return ExitCode::from(2);
    };
    let Some(benchmark) = BENCHMARKS.iter().find(|b| b.name == name) else {
        eprint!("unknown benchmark {name:?}\n{}", usage());
        return ExitCode::from(2);
    };
    match (benchmark.main)(rest) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("bench {name}: {e:#}");
            ExitCode::from(2)
        }
    }
}
