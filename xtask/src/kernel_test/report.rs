//! The tables: one per kernel (each test binary's result), then the matrix (one row per kernel
//! with what the agent's probe found).
use std::time::Duration;

use super::KernelRun;

pub fn duration(d: Duration) -> String {
    let secs = d.as_secs_f64();
    if secs < 60.0 {
        format!("{secs:.1} s")
    } else {
        format!("{}m {:02}s", d.as_secs() / 60, d.as_secs() % 60)
    }
}

fn yes_no(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

/// One kernel's table, to stdout.
pub fn kernel_table(run: &KernelRun) {
    println!();
    println!("== {}: Linux {} on {}", run.label, run.release, run.place);
    println!(
        "   {:<24} {:<8} {:>6} {:>6} {:>9}",
        "test binary", "result", "passed", "failed", "time"
    );
    for r in &run.results {
        println!(
            "   {:<24} {:<8} {:>6} {:>6} {:>9}",
            r.name,
            r.outcome.word(),
            r.summary.passed,
            r.summary.failed,
            duration(Duration::from_secs_f64(r.secs))
        );
        for failure in &r.failures {
            println!("      failed: {failure}");
        }
        if let Some(error) = &r.error {
            println!("      {error}");
        }
        if r.outcome != super::plan::Outcome::Passed {
            println!("      log: {}", r.log);
        }
    }
    if let Some(f) = &run.features {
        match &f.error {
            None => println!(
                "   features: attach={} SOCK_DESTROY={} ring buffer={} BTF={} replay={} lifecycle={}",
                f.attach,
                f.sock_destroy,
                yes_no(f.ring_buffer),
                yes_no(f.btf),
                f.replay,
                yes_no(f.lifecycle)
            ),
            Some(e) => println!("   features: the probe failed: {e}"),
        }
    }
    let mut times = Vec::new();
    if let Some(boot) = run.boot {
        times.push(format!("boot {}", duration(boot)));
    }
    if let Some(secs) = run.tests_secs {
        times.push(format!("tests {}", duration(Duration::from_secs_f64(secs))));
    }
    times.push(format!("wall {}", duration(run.wall)));
    println!("   {}", times.join(", "));
    if let Some(error) = &run.error {
        println!("   FAILED: {error}");
    }
}

/// The matrix, to stdout.
pub fn matrix(runs: &[KernelRun]) {
    println!();
    println!("== kernel matrix");
    println!(
        "   {:<11} {:<22} {:<8} {:>7} {:>7} {:<7} {:<13} {:<5} {:<4} {:<16} {:>8}",
        "kernel",
        "release",
        "result",
        "passed",
        "failed",
        "attach",
        "SOCK_DESTROY",
        "ring",
        "BTF",
        "replay",
        "time"
    );
    for run in runs {
        let passed: u32 = run.results.iter().map(|r| r.summary.passed).sum();
        let failed: u32 = run.results.iter().map(|r| r.summary.failed).sum();
        let f = run.features.clone().unwrap_or_default();
        let release = run
            .release
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_owned();
        println!(
            "   {:<11} {:<22} {:<8} {:>7} {:>7} {:<7} {:<13} {:<5} {:<4} {:<16} {:>8}",
            run.label,
            release,
            if run.passed() { "PASS" } else { "FAIL" },
            passed,
            failed,
            or_dash(&f.attach),
            or_dash(&f.sock_destroy),
            if f.error.is_none() && !f.kernel.is_empty() {
                yes_no(f.ring_buffer)
            } else {
                "-"
            },
            if f.error.is_none() && !f.kernel.is_empty() {
                yes_no(f.btf)
            } else {
                "-"
            },
            or_dash(&f.replay),
            duration(run.wall)
        );
    }
}

fn or_dash(s: &str) -> &str {
    if s.is_empty() { "-" } else { s }
}
