//! Boot tests need /dev/kvm. Where it cannot be opened they are compiled as
//! ignored (`cfg(kvm_missing)`), so the test runner reports them as skipped
//! with the reason instead of passing. Not under CI=true: there they run,
//! and fail naming /dev/kvm.

fn main() {
    println!("cargo::rustc-check-cfg=cfg(kvm_missing)");
    println!("cargo::rerun-if-env-changed=CI");
    println!("cargo::rerun-if-changed=/dev/kvm");
    let ci = std::env::var("CI").is_ok_and(|v| v == "true");
    let kvm = std::fs::File::options()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !ci && !kvm {
        println!("cargo::rustc-cfg=kvm_missing");
    }
}
