//! `rankweave demo`: a tensor- and pipeline-parallel transformer on CPU.
pub mod model;
