//! Drives a host-role `Session` with a sequence of operations (see
//! `src/lib.rs`): raw and tag-correct frames, HELLOs, a real in-memory guest,
//! virtual time, and the host application's calls. Asserts the invariants of
//! `Harness::check` after every operation.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vios_common_fuzz::{run, Input};

fuzz_target!(|input: Input| {
    run(&input);
});
