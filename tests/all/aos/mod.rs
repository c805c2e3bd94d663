//! The aos runtime against AO's own process modules: the §10.3 acceptance sequence (outputs,
//! errors, messages, GasUsed and the SHA-256 of the whole memory after every message, as
//! `@permaweb/ao-loader` 0.0.49 produced them, in tests/data/aos/acceptance.json), restore from a
//! memory snapshot, every loader golden of tests/data/aos/ replayed (`goldens`), and the safety cases. Fixtures come from `support::aos` (skipped loudly when
//! absent, fatal under `REQUIRE_AOS=1`).

mod acceptance;
mod cli;
mod engine_options;
mod goldens;
mod metering;
mod parity;
mod perf;
mod safety;
