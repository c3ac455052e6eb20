//! The one-line JSON writer lives in `vios_common::json` (the daemons'
//! status uses it too).

pub use vios_common::json::*;
