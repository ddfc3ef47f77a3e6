#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| lowbit_fuzz::block_quantize(data));
