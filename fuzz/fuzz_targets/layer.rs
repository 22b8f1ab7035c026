//! The layer check: any file given as `--layer` (or as the tools image).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = std::env::temp_dir().join(format!("uvm-fuzz-layer-{}", std::process::id()));
    std::fs::write(&path, data).expect("write the layer file");
    let _ = vmm::layer::Layer::open(&path);
});
