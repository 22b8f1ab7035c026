//! The JSON an image source holds, as `uvm image import` reads it: the
//! first byte picks an OCI layout's index.json or a docker archive's
//! manifest.json; the rest is that file.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&kind, json)) = data.split_first() else {
        return;
    };
    let dir =
        std::path::Path::new("/dev/shm").join(format!("uvm-fuzz-image-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("blobs/sha256")).expect("a layout directory");
    let name = if kind % 2 == 0 {
        "index.json"
    } else {
        "manifest.json"
    };
    std::fs::write(dir.join(name), json).expect("write the image's JSON");
    // What a docker manifest names as its config, and a layout's blob.
    let config =
        br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
    std::fs::write(dir.join("config.json"), config).expect("write a config");
    let _ = uvm_image::archive::read(&dir, Some("1"), &dir.join("scratch"));
});
