//! The job's timely operators, one per file.

pub mod cap;
pub mod deliver;
pub mod gossip;
pub mod source;
pub mod windows;
