//! placeholder
pub mod harness;
