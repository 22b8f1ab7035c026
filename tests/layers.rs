//! Container layers: read-only pmem layers stacked by the agent with
//! overlayfs over a writable scratch disk (or tmpfs). Tests that boot say
//! why they must; the rest check bad input, which fails before any VM.

mod support;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use support::{
    assert_fails_naming, guest_dir, layer, require_kvm, run, sh, stderr, stdout, tempdir, uvm,
    Watchdog,
};

fn uvm_run(layers: &[PathBuf], args: &[&str], script: &str) -> Command {
    let mut cmd = uvm();
    cmd.arg("run");
    for layer in layers {
        cmd.arg("--layer").arg(layer);
    }
    cmd.args(args).args(["--", "/bin/sh", "-c", script]);
    cmd
}

fn checksum(path: &Path) -> Vec<u8> {
    std::fs::read(path).expect("read layer")
}

// Why boot: only the guest kernel and the agent can show the union: the app
// layer's change wins, its whiteout hides the base file, the mounts are
// what they claim, and nothing a container does reaches the layer files.
#[test]
#[cfg_attr(kvm_missing, ignore = "no usable /dev/kvm on this machine")]
fn base_and_app_layers_stack_and_stay_unchanged() {
    require_kvm("base_and_app_layers_stack_and_stay_unchanged");
    let (base, app) = (layer("base"), layer("app"));
    let before = (checksum(&base), checksum(&app));
    let script = "cat /etc/hello.txt /etc/app.txt; \
        test -e /etc/remove-me.txt && echo remove-me visible; \
        echo scribble > /etc/hello.txt; cat /etc/hello.txt; \
        dd if=/dev/zero of=/dev/pmem0 bs=4096 count=1 2>/dev/null && echo wrote pmem0; \
        cat /proc/mounts";
    let out = run(&mut uvm_run(&[base.clone(), app.clone()], &[], script));
    let text = stdout(&out);
    assert!(out.status.success(), "{}\n{text}", stderr(&out));
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("hello from the app layer"));
    assert_eq!(lines.next(), Some("added by the app layer"));
    assert_eq!(
        lines.next(),
        Some("scribble"),
        "the upper layer takes writes"
    );
    assert!(
        !text.contains("remove-me visible"),
        "whiteout ignored:\n{text}"
    );
    assert!(
        !text.contains("wrote pmem0"),
        "the container wrote a layer device:\n{text}"
    );
    assert!(
        text.contains("overlay / overlay"),
        "no overlay root:\n{text}"
    );
    assert_eq!(
        (checksum(&base), checksum(&app)),
        before,
        "a layer file changed"
    );
}

// Why boot: the agent's DAX mount (and its fallback) happen in the guest;
// /proc/mounts there says what it got.
#[test]
#[cfg_attr(kvm_missing, ignore = "no usable /dev/kvm on this machine")]
fn layers_mount_read_only_with_dax_or_without_when_asked() {
    require_kvm("layers_mount_read_only_with_dax_or_without_when_asked");
    let script = "grep pmem /proc/mounts";
    let dax = run(&mut uvm_run(&[layer("base")], &[], script));
    assert!(dax.status.success(), "{}", stderr(&dax));
    let mounts = stdout(&dax);
    assert!(
        mounts.contains("/dev/pmem0 /run/layers/0 ext4 ro"),
        "{mounts}"
    );
    assert!(mounts.contains("dax"), "no DAX:\n{mounts}");
    let plain = run(&mut uvm_run(&[layer("base")], &["--no-dax"], script));
    assert!(!stdout(&plain).contains("dax"), "{}", stdout(&plain));
}

// Why boot: persistence is the guest writing through virtio-blk into the
// image. One run writes and syncs, then uvm is killed; the next reads back.
#[test]
#[cfg_attr(kvm_missing, ignore = "no usable /dev/kvm on this machine")]
fn scratch_keeps_data_across_runs_even_after_sigkill() {
    require_kvm("scratch_keeps_data_across_runs_even_after_sigkill");
    let dir = tempdir("scratch");
    let scratch = dir.join("scratch.img");
    let args = [
        "--scratch",
        scratch.to_str().unwrap(),
        "--scratch-size",
        "64M",
    ];
    let write =
        "seq 1 20000 > /data.txt; md5sum /data.txt > /data.md5; sync; echo synced; sleep 600";
    let mut child = uvm_run(&[layer("base")], &args, write)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let watchdog = Watchdog::default(&child);
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line, "synced\n");
    // While it runs, the scratch is its own: a second VM is refused before
    // anything boots, naming the file and the VM holding it.
    let second = run(&mut uvm_run(&[layer("base")], &args, "true"));
    let holder = format!("in use by another VM (uvm process {})", child.id());
    assert_fails_naming(&second, &holder);
    assert_fails_naming(&second, scratch.to_str().unwrap());
    child.kill().unwrap(); // SIGKILL: no chance to flush anything more
    child.wait().unwrap();
    drop(watchdog);

    let read = run(&mut uvm_run(&[layer("base")], &args, "md5sum -c /data.md5"));
    assert!(
        read.status.success(),
        "{}\n{}",
        stdout(&read),
        stderr(&read)
    );
    assert!(stdout(&read).contains("/data.txt: OK"), "{}", stdout(&read));
    std::fs::remove_dir_all(dir).unwrap();
}

// Why boot: eight pmem devices at once must all probe and stack.
#[test]
#[cfg_attr(kvm_missing, ignore = "no usable /dev/kvm on this machine")]
fn eight_layers_at_once() {
    require_kvm("eight_layers_at_once");
    let layers: Vec<PathBuf> = std::iter::repeat_n(layer("base"), 7)
        .chain([layer("app")])
        .collect();
    let out = run(&mut uvm_run(
        &layers,
        &[],
        "grep -c pmem /proc/mounts; echo $$; cat /etc/hello.txt",
    ));
    assert!(out.status.success(), "{}", stderr(&out));
    // $$ = 1: the shell is PID 1 of its own PID namespace.
    assert_eq!(stdout(&out), "8\n1\nhello from the app layer\n");
}

// Why boot: only the agent's mounts show what the container sees of a host
// directory and file, and where its writes go: a directory is shared live
// (virtio-fs), a file is a copy.
#[test]
#[cfg_attr(kvm_missing, ignore = "no usable /dev/kvm on this machine")]
fn volumes_share_directories_live_and_copy_files() {
    require_kvm("volumes_share_directories_live_and_copy_files");
    let dir = tempdir("volumes");
    std::fs::create_dir_all(dir.join("data/sub")).unwrap();
    std::fs::create_dir_all(dir.join("ro")).unwrap();
    std::fs::write(dir.join("data/sub/a.txt"), "dir file\n").unwrap();
    std::fs::write(dir.join("ro/kept"), "kept\n").unwrap();
    std::fs::write(dir.join("hosts"), "10.0.0.1 h\n").unwrap();
    let volume = format!("{}:/data", dir.join("data").display());
    let read_only = format!("{}:/ro:ro", dir.join("ro").display());
    let file = format!(
        "type=bind,source={},target=/etc/extra/hosts,readonly",
        dir.join("hosts").display()
    );
    let script = "cat /data/sub/a.txt /etc/extra/hosts; hostname; ulimit -n; \
        echo new > /data/new && mkdir /data/made && cat /data/new; \
        echo x >> /etc/extra/hosts || echo read-only; \
        rm /ro/kept || echo kept; \
        echo t > /scratchy/t && cat /scratchy/t; \
        grep -c ' /scratchy tmpfs' /proc/mounts";
    let out = run(&mut uvm_run(
        &[layer("base")],
        &[
            "-v",
            &volume,
            "-v",
            &read_only,
            "--mount",
            &file,
            "--mount",
            "type=tmpfs,target=/scratchy",
            "--hostname",
            "box",
            "--ulimit",
            "nofile=100:200",
        ],
        script,
    ));
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        stdout(&out),
        "dir file\n10.0.0.1 h\nbox\n100\nnew\nread-only\nkept\nt\n1\n"
    );
    assert!(
        stderr(&out).contains("Read-only file system"),
        "{}",
        stderr(&out)
    );
    // The directory's writes reached the host; the read-only one and the
    // copied file are as they were.
    assert_eq!(
        std::fs::read_to_string(dir.join("data/new")).unwrap(),
        "new\n"
    );
    assert!(dir.join("data/made").is_dir());
    assert_eq!(
        std::fs::read_to_string(dir.join("ro/kept")).unwrap(),
        "kept\n"
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("hosts")).unwrap(),
        "10.0.0.1 h\n"
    );
}

// Why boot: only the agent's mount shows the container a host directory as
// its root, and only the VMM's server puts its writes there.
#[test]
#[cfg_attr(kvm_missing, ignore = "no usable /dev/kvm on this machine")]
fn a_rootfs_is_a_host_directory_the_container_writes_to() {
    require_kvm("a_rootfs_is_a_host_directory_the_container_writes_to");
    let dir = tempdir("rootfs");
    let rootfs = dir.join("rootfs");
    sh(
        r#"rm -rf "$2"; cp -a "$1" "$2""#,
        &[&guest_dir().join("layers/base.d"), &rootfs],
    );
    let mut cmd = uvm();
    cmd.arg("run")
        .arg("--rootfs")
        .arg(&rootfs)
        .args(["--", "/bin/sh", "-c"])
        .arg("grep -c ' / virtiofs' /proc/mounts; echo $$; echo made > /etc/made");
    let out = run(&mut cmd);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "1\n1\n");
    assert_eq!(
        std::fs::read_to_string(rootfs.join("etc/made")).unwrap(),
        "made\n"
    );
}

#[test]
fn bad_volumes_are_refused_before_boot() {
    let missing = run(&mut uvm_run(
        &[layer("base")],
        &["-v", "/nonexistent-uvm-volume:/data"],
        "true",
    ));
    assert_fails_naming(&missing, "volume /nonexistent-uvm-volume");
    let relative = run(&mut uvm_run(&[layer("base")], &["-v", "/tmp:data"], "true"));
    assert_fails_naming(&relative, "GUEST be absolute");
    let no_layers = run(&mut uvm_run(&[], &["-v", "/tmp:/data"], "true"));
    assert_fails_naming(&no_layers, "are for a container");
    let missing = run(&mut uvm_run(
        &[],
        &["--rootfs", "/nonexistent-uvm-root"],
        "true",
    ));
    assert_fails_naming(&missing, "--rootfs /nonexistent-uvm-root");
    let file = run(&mut uvm_run(&[], &["--rootfs", "/etc/passwd"], "true"));
    assert_fails_naming(&file, "not a directory");
    let both = run(&mut uvm_run(
        &[layer("base")],
        &["--rootfs", "/tmp"],
        "true",
    ));
    assert_fails_naming(&both, "cannot be used with");
}

#[test]
fn bad_layers_are_refused_before_boot() {
    let dir = tempdir("bad");
    let empty = dir.join("empty.img");
    std::fs::write(&empty, "").unwrap();
    let text = dir.join("text.img");
    std::fs::write(&text, vec![b'x'; 8192]).unwrap();
    for (layer, reason) in [
        (dir.join("missing.img"), "No such file"),
        (empty.clone(), "empty file"),
        (text.clone(), "not an ext4 image"),
        (dir.clone(), "not a regular file"),
    ] {
        let out = run(&mut uvm_run(std::slice::from_ref(&layer), &[], "true"));
        assert_fails_naming(&out, &format!("layer {}", layer.display()));
        assert_fails_naming(&out, reason);
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn more_layers_than_interrupt_lines_are_refused_before_boot() {
    let out = run(&mut uvm_run(
        &vec![layer("base"); 20],
        &["--console"],
        "true",
    ));
    // The VM's tools (target/guest/tools.img) take a line too.
    assert_fails_naming(
        &out,
        "too many devices: 22 virtio devices (vsock, 20 layers, tools)",
    );
    assert_fails_naming(&out, "lines for 19 (GSIs 5-23); at most 17 layers");
    assert!(!stderr(&out).contains("Linux version"), "the guest booted");
}

#[test]
fn scratch_on_a_read_only_path_is_refused_and_nothing_written() {
    let out = run(&mut uvm_run(
        &[layer("base")],
        &["--scratch", "/proc/uvm-scratch.img"],
        "true",
    ));
    assert_fails_naming(&out, "scratch /proc/uvm-scratch.img");
    assert!(!Path::new("/proc/uvm-scratch.img").exists());
    let no_layer = run(uvm().args(["run", "--scratch", "/tmp/x.img", "--", "true"]));
    assert_fails_naming(&no_layer, "--layer");
}

#[test]
fn layer_create_makes_a_padded_ext4_image() {
    let dir = tempdir("create");
    let from = dir.join("content");
    std::fs::create_dir_all(from.join("etc")).unwrap();
    std::fs::write(from.join("etc/x.txt"), "x").unwrap();
    let image = dir.join("x.img");
    let out = run(uvm()
        .args(["layer", "create", "--from"])
        .arg(&from)
        .arg("-o")
        .arg(&image));
    assert!(out.status.success(), "{}", stderr(&out));
    let bytes = std::fs::read(&image).unwrap();
    assert_eq!(bytes.len() % (2 << 20), 0, "not padded to 2 MiB");
    assert_eq!(&bytes[1024 + 56..1024 + 58], &[0x53, 0xef], "not ext4");
    let missing = run(uvm()
        .args(["layer", "create", "--from", "/nonexistent", "-o"])
        .arg(dir.join("y.img")));
    assert_fails_naming(&missing, "/nonexistent");
    assert!(!dir.join("y.img").exists());
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_killed_layer_create_leaves_no_half_image_and_blocks_nothing() {
    let dir = tempdir("killed-create");
    let tar = dir.join("big.tar");
    let content = dir.join("content");
    std::fs::create_dir_all(&content).unwrap();
    for i in 0..2000 {
        std::fs::write(content.join(format!("f{i}")), [b'x'; 5000]).unwrap();
    }
    let tarred = Command::new("tar")
        .arg("-C")
        .arg(&dir)
        .arg("-cf")
        .arg(&tar)
        .arg("content")
        .status()
        .unwrap();
    assert!(tarred.success());
    let image = dir.join("x.img");
    let create = || {
        let mut cmd = uvm();
        cmd.args(["layer", "create", "--from"])
            .arg(&tar)
            .arg("-o")
            .arg(&image);
        cmd
    };
    let mut child = create()
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Killed once it has started to stage: the old staging and half image
    // stayed, under names the next create wanted too.
    let started = std::time::Instant::now();
    while !names_in(&dir).iter().any(|n| n.contains(".uvm-staging")) {
        assert!(started.elapsed() < Duration::from_secs(60), "never staged");
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(!image.exists(), "a half image at the output");
    let out = run(&mut create());
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        &std::fs::read(&image).unwrap()[1024 + 56..1024 + 58],
        &[0x53, 0xef]
    );
    std::fs::remove_dir_all(dir).unwrap();
}

fn names_in(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

// Why boot: only a guest store shows that a read-only slot drops writes.
// The guest kernel refuses writes to a mounted /dev/pmemN (it is built
// without BLK_DEV_WRITE_MOUNTED), so the write goes to the one pmem device
// nobody mounted, the VM's tools image, straight through the pmem driver:
// the guest sees its write succeed, reads the old bytes back, and the file
// stays as it was.
#[test]
#[cfg_attr(kvm_missing, ignore = "no usable /dev/kvm on this machine")]
fn a_guest_write_into_a_read_only_slot_is_dropped() {
    require_kvm("a_guest_write_into_a_read_only_slot_is_dropped");
    let dir = tempdir("read-only-slot");
    let tools = dir.join("tools.img");
    std::fs::copy(support::guest_dir().join("tools.img"), &tools).expect("copy the tools");
    let before = checksum(&tools);
    let script = "head -c 4096 /dev/pmem1 | md5sum; \
                  yes X | head -c 4096 > /tmp/x; \
                  dd if=/tmp/x of=/dev/pmem1 bs=4096 count=1 conv=fsync 2>/dev/null && echo written; \
                  dd if=/tmp/x of=/dev/pmem0 bs=4096 count=1 2>/dev/null || echo mounted-refused; \
                  echo 3 > /proc/sys/vm/drop_caches; head -c 4096 /dev/pmem1 | md5sum";
    let mut cmd = uvm();
    cmd.args(["run", "--layer"]).arg(layer("base"));
    cmd.arg("--tools").arg(&tools);
    let out = run(cmd.args(["--", "/bin/sh", "-c", script]));
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 4, "{text}");
    assert_eq!(&lines[1..3], ["written", "mounted-refused"], "{text}");
    assert_eq!(
        lines[0], lines[3],
        "the guest read back its own write:\n{text}"
    );
    assert!(checksum(&tools) == before, "the tools image changed");
    std::fs::remove_dir_all(&dir).unwrap();
}
