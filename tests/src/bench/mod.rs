//! Benchmarks run by `cargo xtask bench NAME` (`src/bin/bench.rs`), one module each.
//!
//! Each benchmark prints a human table on stderr and exactly one JSON line on stdout, so a
//! script can keep the numbers and a person can read them.

pub mod chart;
pub mod overhead;
pub mod reconnect;
pub mod scale;
pub mod support;

use std::time::Duration;

use serde::Serialize;

/// A whole number in `lo..=hi`, as a clap value parser.
pub fn count_in(
    lo: usize,
    hi: usize,
) -> impl Fn(&str) -> Result<usize, String> + Clone + Send + Sync + 'static {
    move |s| match s.parse::<usize>() {
        Ok(n) if (lo..=hi).contains(&n) => Ok(n),
        _ => Err(format!("expected a whole number from {lo} to {hi}")),
    }
}

/// A number in `lo..=hi`, as a clap value parser.
pub fn number_in(
    lo: f64,
    hi: f64,
) -> impl Fn(&str) -> Result<f64, String> + Clone + Send + Sync + 'static {
    move |s| match s.parse::<f64>() {
        Ok(x) if (lo..=hi).contains(&x) => Ok(x),
        _ => Err(format!("expected a number from {lo} to {hi}")),
    }
}

/// Parses `args` as a benchmark's options, as `bench NAME ARGS...` would.
#[cfg(test)]
pub(crate) fn parse_options<T: clap::Args>(args: &[&str]) -> Result<T, clap::Error> {
    #[derive(clap::Parser)]
    struct Cli<T: clap::Args> {
        #[command(flatten)]
        options: T,
    }
    let args = std::iter::once("bench").chain(args.iter().copied());
    <Cli<T> as clap::Parser>::try_parse_from(args).map(|cli| cli.options)
}

/// `items` without repeats, first occurrence kept.
pub fn dedup<T: PartialEq + Copy>(items: &[T]) -> Vec<T> {
    let mut out = Vec::new();
    for &item in items {
        if !out.contains(&item) {
            out.push(item);
        }
    }
    out
}

/// Nearest-rank percentiles of a set of durations, in milliseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Percentiles {
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Percentiles {
    /// `None` for an empty sample.
    pub fn of(samples: &[Duration]) -> Option<Percentiles> {
        let mut ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e3).collect();
        if ms.is_empty() {
            return None;
        }
        ms.sort_by(f64::total_cmp);
        Some(Percentiles {
            p50_ms: nearest_rank(&ms, 50),
            p90_ms: nearest_rank(&ms, 90),
            p99_ms: nearest_rank(&ms, 99),
            max_ms: ms[ms.len() - 1],
        })
    }
}

/// The nearest-rank `p`th percentile of sorted, non-empty `sorted`: the smallest value with at
/// least `p` % of the sample at or below it.
pub fn nearest_rank(sorted: &[f64], p: u32) -> f64 {
    let n = sorted.len();
    // ceil(p/100 * n), at least 1.
    let rank = (usize::try_from(p).unwrap_or(100) * n).div_ceil(100).max(1);
    sorted[rank.min(n) - 1]
}

/// Rounds to 3 decimals (µs resolution for milliseconds) for the JSON line.
pub fn round3(x: f64) -> f64 {
    (x * 1e3).round() / 1e3
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(nearest_rank(&v, 50), 50.0);
        assert_eq!(nearest_rank(&v, 90), 90.0);
        assert_eq!(nearest_rank(&v, 99), 99.0);
        assert_eq!(nearest_rank(&v, 100), 100.0);
        assert_eq!(nearest_rank(&[7.0], 50), 7.0);
        let v = [1.0, 2.0, 3.0];
        assert_eq!(nearest_rank(&v, 50), 2.0);
        assert_eq!(nearest_rank(&v, 99), 3.0);
        let p = Percentiles::of(&[
            Duration::from_millis(3),
            Duration::from_millis(1),
            Duration::from_millis(2),
        ])
        .expect("non-empty");
        assert_eq!((p.p50_ms, p.max_ms), (2.0, 3.0));
        assert!(Percentiles::of(&[]).is_none());
    }
}
