#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| lowbit_fuzz::gguf_file(data));
