//! Runs `mailmoat::fuzzing::proxy_header`; the properties it asserts are listed there.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| mailmoat::fuzzing::proxy_header(data));
