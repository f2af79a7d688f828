//! spark's end-to-end suites, one test binary (codex `app-server/tests/all.rs` style).

mod suite;
