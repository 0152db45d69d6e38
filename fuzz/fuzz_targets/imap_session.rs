//! Runs `mailmoat::fuzzing::imap_session`; the properties it asserts are listed there.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| mailmoat::fuzzing::imap_session(data));
