//! Reliability, long form: 100 `kill -9` rounds during multi-file applies, undo and stash
//! (the CI smoke runs 10). `SPARK_RELIABILITY_ROUNDS` changes the count,
//! `SPARK_RELIABILITY_SEED` replays a run, `SPARK_RELIABILITY_TYPIST=1` adds the typist
//! appending to an edited file and `SPARK_RELIABILITY_STASH=1` adds `stash` to the operations
//! (see docs/RELIABILITY.md, "Crashes").
//!
//! Run: `cargo bench -p spark-tests --bench reliability`.

fn main() {
    let rounds = std::env::var("SPARK_RELIABILITY_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let typist = std::env::var("SPARK_RELIABILITY_TYPIST").is_ok_and(|v| v == "1");
    let stash = std::env::var("SPARK_RELIABILITY_STASH").is_ok_and(|v| v == "1");
    let seed = spark_tests::kill_rounds::seed();
    let started = std::time::Instant::now();
    let totals = spark_tests::kill_rounds::run(rounds, seed, typist, stash);
    println!(
        "kill rounds: {} rounds in {:.1?} (typist: {typist}, stash: {stash}); {} operations completed, {} interrupted by the kill, {} refused as racing the typist; {} rounds ended after the edit; {} typist lines kept",
        totals.rounds,
        started.elapsed(),
        totals.ops_completed,
        totals.ops_interrupted,
        totals.ops_refused_racing,
        totals.ended_after,
        totals.typist_lines,
    );
}
