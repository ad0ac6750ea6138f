//! placeholder

pub mod vmhost;
