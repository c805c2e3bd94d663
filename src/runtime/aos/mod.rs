//! aos process modules (docs/aos.md): the `…-metering` formats' gas instrumentation.

pub mod metering;
