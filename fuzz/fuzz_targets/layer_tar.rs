//! A layer's tar stream as `uvm image import`, `uvm pull` and
//! `uvm layer create` unpack it: entries, names, links, whiteouts, PAX
//! records (the image is not built: mkfs and debugfs are not ours).
#![no_main]

use libfuzzer_sys::fuzz_target;
use uvm_image::convert::Stack;

fuzz_target!(|data: &[u8]| {
    let work =
        std::path::Path::new("/dev/shm").join(format!("uvm-fuzz-tar-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    let mut stack = Stack::new(&work).expect("a staging directory");
    // Two layers, so that the second one's whiteouts apply to the first.
    if stack.add(data, "fuzz layer").is_ok() {
        let _ = stack.add(data, "fuzz layer");
    }
});
