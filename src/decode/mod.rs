//! Decode: the bytes of the change stream into typed messages.
//!
//! No I/O and no panics here, so it can be tested and fuzzed on its own.

pub mod json;
pub mod pgoutput;
pub mod time;
pub mod types;
