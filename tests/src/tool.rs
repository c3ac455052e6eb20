//! Pieces the test tools (`vios-load`, `vios-hostile`) share.

pub mod json;
pub mod process;
