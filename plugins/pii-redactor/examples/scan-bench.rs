//! The scanner's native cost per prompt: `cargo run --release -p pii-redactor --example scan-bench`.
//!
//! Scans the prompts `bench/src/bin/plugin-bench.rs` sends (prose with an e-mail address, a phone
//! number and a card number in every 200 bytes) at 200 B, 2 KB and 32 KB, and prints the median
//! and p99 of many scans: the scanner alone, without the Wasm instance around it.

use std::hint::black_box;
use std::time::{Duration, Instant};

use pii_redactor::scan::scan;

/// The benchmark's prose, cut to `bytes` (the same text as plugin-bench's `prompt`).
fn prompt(bytes: usize) -> String {
    const CHUNK: &str = "Please write to jane.doe@example.com or call +44 20 7946 0958 about the refund of \
        order 4411 paid with 4111 1111 1111 1111 last Tuesday; the customer prefers e-mail. ";
    CHUNK.repeat(bytes.div_ceil(CHUNK.len()))[..bytes].to_string()
}

fn main() {
    for bytes in [200, 2_048, 32_768] {
        let text = prompt(bytes);
        let rounds = (4_000_000 / bytes).max(200);
        let mut times: Vec<Duration> = (0..rounds)
            .map(|_| {
                let t = Instant::now();
                black_box(scan(black_box(&text)).count());
                t.elapsed()
            })
            .collect();
        times.sort();
        let at = |p: f64| times[((times.len() - 1) as f64 * p) as usize].as_secs_f64() * 1e6;
        println!("{bytes:>6} B: p50 {:>8.2} µs  p99 {:>8.2} µs  ({rounds} scans)", at(0.5), at(0.99));
    }
}
