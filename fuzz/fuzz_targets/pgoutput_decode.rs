//! Arbitrary bytes as a pgoutput message: the decoder returns an error, never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = polysync::source::postgres::decode::decode(bytes::Bytes::copy_from_slice(data));
});
