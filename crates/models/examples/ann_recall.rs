//! Build time, recall@10 against the exact scan, and single-thread search latency of the
//! usearch HNSW retriever on synthetic clustered vectors.
//!
//! ```text
//! cargo run --release -p reflex-models --example ann_recall -- \
//!     [--items 100000,1000000] [--dims 64] [--clusters 200] [--noise 0.35] \
//!     [--queries 1000] [--ef 64,128] [--build-threads 1] [--quantization f32]
//! ```
//!
//! Items are Gaussian clusters (centres N(0, 1) per dimension, items centre + N(0,
//! noise²)); queries are drawn from the same mixture. Latency is one thread issuing
//! searches back to back through `Retriever::search` (graph walk, filter, rescoring).

use std::sync::Arc;
use std::time::{Duration, Instant};

use reflex_core::hash::{GOLDEN_GAMMA, finalise};
use reflex_core::{ItemIdx, Retriever};
use reflex_models::{AnnConfig, AnnRetriever, ExactRetriever, ItemFactors, Quantization};

/// Passes over the queries when timing searches.
const REPS: usize = 3;

/// Deterministic pseudo-random numbers (textbook SplitMix64 over the workspace's
/// finaliser), so every run sees the same vectors.
struct Gen(u64);

impl Gen {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(GOLDEN_GAMMA);
        finalise(self.0)
    }

    fn uniform(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 + 0.5) / (1u64 << 24) as f32
    }

    fn gaussian(&mut self) -> f32 {
        let (u, v) = (self.uniform(), self.uniform());
        (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
    }
}

struct Args {
    items: Vec<usize>,
    dims: usize,
    clusters: usize,
    noise: f32,
    queries: usize,
    ef: Vec<usize>,
    build_threads: usize,
    quantization: Quantization,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        items: vec![100_000, 1_000_000],
        dims: 64,
        clusters: 200,
        noise: 0.35,
        queries: 1000,
        ef: vec![64, 128],
        build_threads: 1,
        quantization: Quantization::F32,
    };
    let list = |v: &str| -> Result<Vec<usize>, String> {
        v.split(',')
            .map(|x| x.trim().parse().map_err(|e| format!("{x}: {e}")))
            .collect()
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let num = |v: &str| v.parse::<usize>().map_err(|e| format!("{flag}: {e}"));
        match flag.as_str() {
            "--items" => a.items = list(&value)?,
            "--dims" => a.dims = num(&value)?,
            "--clusters" => a.clusters = num(&value)?,
            "--noise" => a.noise = value.parse().map_err(|e| format!("{flag}: {e}"))?,
            "--queries" => a.queries = num(&value)?,
            "--ef" => a.ef = list(&value)?,
            "--build-threads" => a.build_threads = num(&value)?,
            "--quantization" => {
                a.quantization = match value.as_str() {
                    "f32" => Quantization::F32,
                    "f16" => Quantization::F16,
                    "i8" => Quantization::I8,
                    other => return Err(format!("unknown quantization {other}")),
                }
            }
            other => return Err(format!("unknown flag {other}")),
        }
    }
    Ok(a)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = parse_args()?;
    println!(
        "dims {}, {} clusters, noise {}, {} queries, {:?}, build threads {}",
        args.dims, args.clusters, args.noise, args.queries, args.quantization, args.build_threads
    );
    for &n in &args.items {
        let mut g = Gen(2024);
        let centres: Vec<Vec<f32>> = (0..args.clusters)
            .map(|_| (0..args.dims).map(|_| g.gaussian()).collect())
            .collect();
        let sample = |g: &mut Gen| -> Vec<f32> {
            let c = &centres[(g.next_u64() % centres.len() as u64) as usize];
            c.iter().map(|x| x + g.gaussian() * args.noise).collect()
        };
        let factors = Arc::new(ItemFactors::new(args.dims, 0.1, 7));
        for item in 0..n as ItemIdx {
            factors.set(item, &sample(&mut g));
        }
        let queries: Vec<Vec<f32>> = (0..args.queries).map(|_| sample(&mut g)).collect();

        let config = AnnConfig {
            quantization: args.quantization,
            build_threads: args.build_threads,
            expansion_search: args.ef.first().copied().unwrap_or(64),
            ..AnnConfig::default()
        };
        let started = Instant::now();
        let ann = AnnRetriever::new(factors.clone(), config)?;
        let build = started.elapsed();
        let shape = ann.shape();
        println!(
            "\n{n} items: built in {:.1} s ({:.0} items/s), index memory {:.0} MiB, M {}, ef_add {}",
            build.as_secs_f64(),
            n as f64 / build.as_secs_f64(),
            shape.memory_bytes as f64 / (1 << 20) as f64,
            shape.connectivity,
            shape.expansion_add,
        );

        let exact = ExactRetriever::new(factors.clone());
        let all = |_: ItemIdx| true;
        let mut exact_times = Vec::with_capacity(queries.len());
        let truth: Vec<Vec<ItemIdx>> = queries
            .iter()
            .map(|q| {
                let t = Instant::now();
                let top = exact.search(q, 10, &all);
                exact_times.push(t.elapsed());
                top.iter().map(|s| s.item).collect()
            })
            .collect();
        exact_times.sort();
        println!(
            "  exact scan: p50 {:.2} ms, p99 {:.2} ms",
            percentile(&exact_times, 0.5).as_secs_f64() * 1e3,
            percentile(&exact_times, 0.99).as_secs_f64() * 1e3
        );

        let half = |i: ItemIdx| i.is_multiple_of(2);
        // Ground truth under the filter, computed before any timing so exact scans do not
        // evict the index from the caches between timed searches.
        let truth_half: Vec<Vec<ItemIdx>> = queries
            .iter()
            .map(|q| exact.search(q, 10, &half).iter().map(|s| s.item).collect())
            .collect();
        for &ef in &args.ef {
            if ann.shape().expansion_search != ef {
                ann.set_expansion_search(ef)?;
            }
            for (label, filter, truth) in [
                ("no filter", &all as &dyn Fn(ItemIdx) -> bool, &truth),
                ("half filtered", &half, &truth_half),
            ] {
                // Warm up caches and usearch's per-thread context.
                for q in queries.iter().take(50) {
                    let _ = ann.search(q, 10, filter);
                }
                let before = ann.stats();
                // Each query runs `REPS` times, interleaved; the first pass gives the raw
                // latencies, and the per-query minimum removes scheduler noise (another
                // process's time slice) while keeping query-dependent cost.
                let mut first = Vec::with_capacity(queries.len());
                let mut best = vec![Duration::MAX; queries.len()];
                let mut hits = 0usize;
                let mut wanted = 0usize;
                for rep in 0..REPS {
                    for (n, (q, want)) in queries.iter().zip(truth).enumerate() {
                        let t = Instant::now();
                        let found = ann.search(q, 10, filter);
                        let took = t.elapsed();
                        best[n] = best[n].min(took);
                        if rep > 0 {
                            continue;
                        }
                        first.push(took);
                        hits += found.iter().filter(|s| want.contains(&s.item)).count();
                        wanted += want.len();
                    }
                }
                first.sort();
                best.sort();
                let after = ann.stats();
                let ms = |d: Duration| d.as_secs_f64() * 1e3;
                println!(
                    "  ef {ef:>3}, {label:<13}: recall@10 {:.4} | raw p50 {:.3} p99 {:.3} max {:.3} ms \
                     | min-of-{REPS} p50 {:.3} p99 {:.3} max {:.3} ms | exact fallbacks {}",
                    hits as f64 / wanted as f64,
                    ms(percentile(&first, 0.5)),
                    ms(percentile(&first, 0.99)),
                    ms(*first.last().unwrap_or(&Duration::ZERO)),
                    ms(percentile(&best, 0.5)),
                    ms(percentile(&best, 0.99)),
                    ms(*best.last().unwrap_or(&Duration::ZERO)),
                    after.exact_fallbacks - before.exact_fallbacks,
                );
            }
        }
    }
    Ok(())
}
