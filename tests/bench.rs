//! `uvm bench`: boots real VMs under uvm and QEMU microvm and reports them.
//! Two tests boot (each says why); the rest check bad input and stored
//! results, which need no VM.

mod support;

use std::process::{Output, Stdio};
use std::time::Duration;

use support::{assert_fails_naming, require_kvm, stderr, stdout, tempdir, uvm, Watchdog};

/// A bench boots several VMs one after another.
const BENCH_TIMEOUT: Duration = Duration::from_secs(1200);

fn bench(args: &[&str]) -> Output {
    let child = uvm()
        .arg("bench")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn uvm bench");
    let watchdog = Watchdog::new(&child, BENCH_TIMEOUT);
    let out = child.wait_with_output().expect("collect uvm bench output");
    assert!(!watchdog.fired(), "uvm bench hung:\n{}", stderr(&out));
    out
}

fn path_arg(path: &std::path::Path) -> &str {
    path.to_str().unwrap()
}

fn json(path: &std::path::Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

const PER_VM: [&str; 7] = [
    "ready_ms",
    "process_started_ms",
    "process_exited_ms",
    "total_ms",
    "vmm_cpu_ms",
    "vmm_rss_kib",
    "vmm_setup_ms",
];

// Why boot: the numbers only exist when real VMs boot under both VMMs, and
// only a real QEMU shows that its guest reaches the same marks. Three runs
// each, as few as still give a min, median, p90 and max. The command reads
// its stdin: it must see the end of it under both VMMs.
#[test]
#[cfg_attr(kvm_missing, ignore = "no usable /dev/kvm on this machine")]
fn against_qemu_reports_every_phase_plots_and_gates() {
    require_kvm("against_qemu_reports_every_phase_plots_and_gates");
    let dir = tempdir("qemu");
    let (results, plot) = (dir.join("out.json"), dir.join("out.svg"));
    let out = bench(&[
        "--runs",
        "3",
        "--warmup",
        "0",
        "--against",
        "qemu",
        "--json",
        path_arg(&results),
        "--plot",
        path_arg(&plot),
        "--",
        "/bin/cat",
    ]);
    let table = stdout(&out);
    assert!(out.status.success(), "{table}\n{}", stderr(&out));
    for expected in [
        "`/bin/cat`",
        "uvm vmlinux",
        "qemu vmlinux",
        "uvm/qemu vmlinux",
        "total_ms",
        "p90",
    ] {
        assert!(table.contains(expected), "no {expected:?} in:\n{table}");
    }

    let stored = json(&results);
    let series = stored["series"].as_array().unwrap();
    assert_eq!(series.len(), 2);
    for s in series {
        let batches = s["batches"].as_array().unwrap();
        assert_eq!(batches.len(), 3, "{}", s["name"]);
        for sample in batches
            .iter()
            .flat_map(|b| b["samples"].as_array().unwrap())
        {
            let uvm = s["vmm"] == "uvm";
            for key in PER_VM {
                let optional = !uvm && key == "vmm_setup_ms";
                assert!(
                    optional || sample[key].as_f64().is_some(),
                    "{key}: {sample}"
                );
            }
            let at = |key: &str| sample[key].as_f64().unwrap();
            let marks = [
                "ready_ms",
                "process_started_ms",
                "process_exited_ms",
                "total_ms",
            ];
            assert!(marks.windows(2).all(|w| at(w[0]) <= at(w[1])), "{sample}");
        }
        assert!(s["summary"]["total_ms"]["median"].as_f64().unwrap() > 0.0);
    }

    let svg = std::fs::read_to_string(&plot).unwrap();
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    assert!(
        svg.matches("<circle").count() >= 12,
        "a dot per VM and panel"
    );

    // The gate passes on the run's own output...
    let same = bench(&[
        "--results",
        path_arg(&results),
        "--baseline",
        path_arg(&results),
    ]);
    assert!(same.status.success(), "{}", stderr(&same));
    assert!(stdout(&same).contains("+0.0%"), "{}", stdout(&same));
    // ...and fails on a baseline doctored to be twice as fast.
    let mut doctored = stored.clone();
    for s in doctored["series"].as_array_mut().unwrap() {
        for b in s["batches"].as_array_mut().unwrap() {
            for sample in b["samples"].as_array_mut().unwrap() {
                let total = sample["total_ms"].as_f64().unwrap();
                sample["total_ms"] = (total / 2.0).into();
            }
        }
    }
    let faster = dir.join("faster.json");
    std::fs::write(&faster, doctored.to_string()).unwrap();
    let gate = bench(&[
        "--results",
        path_arg(&results),
        "--baseline",
        path_arg(&faster),
        "--max-regression",
        "10%",
    ]);
    assert_fails_naming(&gate, "slower than the baseline");
    assert!(stdout(&gate).contains("+100.0%") && stdout(&gate).contains("REGRESSION"));
    std::fs::remove_dir_all(dir).unwrap();
}

// Why boot: density is about real VMs sharing the host: two at once must
// both get ready, and their memory must show.
#[test]
#[cfg_attr(kvm_missing, ignore = "no usable /dev/kvm on this machine")]
fn parallel_vms_report_all_ready_and_host_memory() {
    require_kvm("parallel_vms_report_all_ready_and_host_memory");
    let dir = tempdir("parallel");
    let results = dir.join("out.json");
    let out = bench(&[
        "--runs",
        "1",
        "--warmup",
        "0",
        "--parallel",
        "2",
        "--json",
        path_arg(&results),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("2 VMs at once"), "{}", stdout(&out));
    let stored = json(&results);
    let batch = &stored["series"][0]["batches"][0];
    let samples = batch["samples"].as_array().unwrap();
    assert_eq!(samples.len(), 2);
    let all_ready = batch["all_ready_ms"].as_f64().unwrap();
    assert!(samples
        .iter()
        .all(|s| s["ready_ms"].as_f64().unwrap() <= all_ready));
    // Two guests each touch megabytes of their RAM.
    assert!(
        batch["host_memory_kib"].as_u64().unwrap() > 2 * 1024,
        "{batch}"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn bad_input_fails_before_any_vm_boots() {
    let missing_kernel = bench(&["--kernel", "/nonexistent/vmlinux"]);
    assert_fails_naming(&missing_kernel, "kernel /nonexistent/vmlinux");
    let no_qemu = bench(&["--against", "qemu", "--qemu", "/nonexistent/qemu"]);
    assert_fails_naming(&no_qemu, "qemu-system-x86");
    let bad_percent = bench(&["--max-regression", "ten"]);
    assert_fails_naming(&bad_percent, "expected a percentage");
    let not_results = bench(&["--results", "/etc/hostname"]);
    assert_fails_naming(&not_results, "not uvm bench JSON");
    let missing_results = bench(&["--results", "/nonexistent.json"]);
    assert_fails_naming(&missing_results, "/nonexistent.json");
    let missing_baseline = bench(&["--baseline", "/nonexistent-baseline.json"]);
    assert_fails_naming(&missing_baseline, "/nonexistent-baseline.json");
    let endless = bench(&["--warmup", "4294967295"]);
    assert_fails_naming(&endless, "--warmup");
}
