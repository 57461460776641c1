#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| till_fuzz::http(data));
