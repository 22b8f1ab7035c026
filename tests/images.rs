//! Container images (issue 13): built with Debian's real tools (umoci,
//! skopeo) from a busybox rootfs, saved as an OCI layout, an OCI archive
//! (zstd layers) and a docker archive, imported into a store and run with
//! their config. Only the run tests boot, one per format.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use support::{assert_fails_naming, run, sh, stderr, stdout, tempdir, uvm};

/// The test image's default command shows who, where and with what it runs,
/// and what its two upper layers deleted (/data/a) and replaced (/keep).
const CMD: &str = "id -u; id -G; pwd; echo A=$A B=$B; ls /data /keep";

/// The test image in its three formats, built once per test binary.
struct Images {
    dir: PathBuf,
    layout: PathBuf,
    oci_archive: PathBuf,
    docker_archive: PathBuf,
}

fn images() -> &'static Images {
    static IMAGES: OnceLock<Images> = OnceLock::new();
    IMAGES.get_or_init(|| {
        let dir = tempdir("images");
        let images = Images {
            layout: dir.join("oci"),
            oci_archive: dir.join("image.oci.tar"),
            docker_archive: dir.join("image.docker.tar"),
            dir,
        };
        build(&images);
        images
    })
}

/// A busybox base layer (umoci repack, gzip) with an account for `app`,
/// then a layer from a tar written by hand: a whiteout of /data/a and an
/// opaque /keep holding only y.
fn build(images: &Images) {
    let d = &images.dir;
    sh(
        r#"d=$1; rm -rf "$d/oci" "$d/bundle" "$d/upper"
        umoci init --layout "$d/oci"
        umoci new --image "$d/oci:1"
        umoci unpack --image "$d/oci:1" "$d/bundle"
        r="$d/bundle/rootfs"; mkdir -p "$r/bin" "$r/etc" "$r/data" "$r/keep" "$r/home/app" "$r/tmp"
        cp /bin/busybox "$r/bin/busybox"
        for a in sh echo id ls pwd cat true env; do ln -s busybox "$r/bin/$a"; done
        printf 'root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\n' > "$r/etc/passwd"
        printf 'root:x:0:\napp:x:1000:\nstaff:x:50:app\n' > "$r/etc/group"
        echo a > "$r/data/a"; echo b > "$r/data/b"; echo x > "$r/keep/x"
        chown 1000:1000 "$r/home/app"
        umoci repack --image "$d/oci:1" "$d/bundle"
        mkdir -p "$d/upper/data" "$d/upper/keep"
        : > "$d/upper/data/.wh.a"; : > "$d/upper/keep/.wh..wh..opq"; echo y > "$d/upper/keep/y"
        tar -C "$d/upper" -cf "$d/upper.tar" data keep
        umoci raw add-layer --image "$d/oci:1" "$d/upper.tar"
        umoci config --image "$d/oci:1" --config.cmd /bin/sh --config.cmd -c --config.cmd "$2" \
            --config.env A=1 --config.env B=2 --config.workingdir /home/app --config.user app
        # skopeo's own scratch space, not /var/tmp (read-only in the nested L1).
        skopeo --tmpdir "$d" copy -q --dest-compress-format zstd "oci:$d/oci:1" "oci-archive:$d/image.oci.tar:1"
        skopeo --tmpdir "$d" copy -q "oci:$d/oci:1" "docker-archive:$d/image.docker.tar:localhost/docker-img:1"
        "#,
        &[d, Path::new(CMD)],
    );
}

fn store(name: &str) -> PathBuf {
    let dir = tempdir(&format!("store-{name}"));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn in_store(store: &Path, args: &[&str]) -> std::process::Output {
    run(uvm().env("UVM_STORE", store).args(args))
}

fn import(store: &Path, source: &Path, name: Option<&str>) -> String {
    let mut cmd = uvm();
    cmd.env("UVM_STORE", store)
        .arg("image")
        .arg("import")
        .arg(source);
    if let Some(name) = name {
        cmd.args(["--name", name]);
    }
    let out = run(&mut cmd);
    assert!(
        out.status.success(),
        "import {}: {}",
        source.display(),
        stderr(&out)
    );
    stderr(&out)
}

/// The files of a store directory.
fn files(store: &Path, dir: &str) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(store.join(dir))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

fn layers(store: &Path) -> usize {
    files(store, "layers")
        .iter()
        .filter(|n| n.ends_with(".ext4"))
        .count()
}

#[test]
fn the_three_formats_import_and_share_their_layers() {
    let images = images();
    let store = store("formats");
    let first = import(&store, &images.layout, Some("localhost/layout:1"));
    assert_eq!(first.matches("converted").count(), 2, "{first}");
    // The zstd copy has the same uncompressed layers: none converted again.
    let again = import(&store, &images.oci_archive, Some("localhost/zstd:1"));
    assert_eq!(again.matches("already stored").count(), 2, "{again}");
    import(&store, &images.docker_archive, None);
    assert_eq!(layers(&store), 2);
    let list = stdout(&in_store(&store, &["images"]));
    for name in [
        "localhost/layout:1",
        "localhost/zstd:1",
        "localhost/docker-img:1",
    ] {
        assert!(list.contains(name), "{list}");
    }
    let inspect = in_store(&store, &["image", "inspect", "localhost/docker-img:1"]);
    let config: serde_json::Value = serde_json::from_slice(&inspect.stdout).unwrap();
    assert_eq!(config["config"]["config"]["User"], "app");

    // A name goes, the image and layers others use stay.
    assert!(in_store(&store, &["rmi", "localhost/layout:1"])
        .status
        .success());
    assert_eq!(layers(&store), 2);
    for name in ["localhost/zstd:1", "localhost/docker-img:1"] {
        assert!(in_store(&store, &["rmi", name]).status.success());
    }
    assert_eq!(layers(&store), 0, "the last image took its layers");
    assert!(files(&store, "images").is_empty());
    assert_fails_naming(
        &in_store(&store, &["rmi", "localhost/zstd:1"]),
        "image localhost/zstd:1: not in the store",
    );
}

#[test]
fn an_unprivileged_import_keeps_the_layers_owners() {
    let images = images();
    // The caller's store, in a directory of the test's own.
    let dir = tempdir("unprivileged");
    let store = dir.join("store");
    std::fs::create_dir_all(&store).unwrap();
    sh(r#"chmod 755 "$1"; chown 65534:65534 "$1/store""#, &[&dir]);
    let out = run(Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(env!("CARGO_BIN_EXE_uvm"))
        .env("UVM_STORE", &store)
        .arg("image")
        .arg("import")
        .arg(&images.docker_archive));
    assert!(out.status.success(), "{}", stderr(&out));
    let base = std::fs::read_dir(store.join("layers"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "ext4"))
        .find(|p| debugfs_stat(p, "/home/app").contains("User:  1000"));
    assert!(base.is_some(), "no layer has /home/app owned by 1000");
    let base = base.unwrap();
    assert!(debugfs_stat(&base, "/bin/busybox").contains("User:     0"));
}

fn debugfs_stat(image: &Path, path: &str) -> String {
    let out = run(Command::new("debugfs")
        .args(["-R", &format!("stat {path}")])
        .arg(image));
    stdout(&out)
}

/// A copy of the OCI layout with its (only) gzip layer blob changed by `spoil`.
fn spoiled_layout(name: &str, spoil: impl Fn(&mut Vec<u8>)) -> PathBuf {
    let copy = tempdir(name).join("oci");
    let _ = std::fs::remove_dir_all(&copy);
    sh(r#"cp -a "$1" "$2""#, &[&images().layout, &copy]);
    let blobs = copy.join("blobs/sha256");
    let biggest = std::fs::read_dir(&blobs)
        .unwrap()
        .flatten()
        .max_by_key(|e| e.metadata().unwrap().len())
        .unwrap()
        .path();
    let mut bytes = std::fs::read(&biggest).unwrap();
    spoil(&mut bytes);
    std::fs::write(&biggest, bytes).unwrap();
    copy
}

fn assert_nothing_half_written(store: &Path) {
    assert_eq!(layers(store), 0, "{:?}", files(store, "layers"));
    assert!(files(store, "images").is_empty());
    assert!(files(store, "tmp").is_empty(), "{:?}", files(store, "tmp"));
}

#[test]
fn bad_images_are_refused_naming_what_is_wrong_and_leave_nothing() {
    let store = store("bad");
    let corrupt = spoiled_layout("corrupt", |b| {
        let at = b.len() / 2;
        b[at] ^= 0xff;
    });
    let out = in_store(
        &store,
        &["image", "import", corrupt.to_str().unwrap(), "--name", "x"],
    );
    assert_fails_naming(&out, "layer blob sha256:");
    assert_nothing_half_written(&store);

    let truncated = spoiled_layout("truncated", |b| b.truncate(b.len() / 2));
    let out = in_store(
        &store,
        &[
            "image",
            "import",
            truncated.to_str().unwrap(),
            "--name",
            "x",
        ],
    );
    assert_fails_naming(&out, "layer blob sha256:");
    assert_nothing_half_written(&store);

    // A docker archive whose manifest lists one layer of the config's two.
    let dir = tempdir("mismatch");
    sh(
        r#"rm -rf "$2/x"; mkdir -p "$2/x"; tar -C "$2/x" -xf "$1"
        sed -i 's/"Layers":\["\([^"]*\)",[^]]*\]/"Layers":["\1"]/' "$2/x/manifest.json"
        tar -C "$2/x" -cf "$2/mismatch.tar" ."#,
        &[&images().docker_archive, &dir],
    );
    let out = in_store(
        &store,
        &[
            "image",
            "import",
            dir.join("mismatch.tar").to_str().unwrap(),
        ],
    );
    assert_fails_naming(
        &out,
        "the manifest has 1 layers but the config's rootfs has 2 diff_ids",
    );
    assert_nothing_half_written(&store);

    let not_image = in_store(&store, &["image", "import", "/etc/hostname"]);
    assert_fails_naming(&not_image, "/etc/hostname: reading it as a tar archive");
    let missing = in_store(&store, &["image", "import", "/no/such/image"]);
    assert_fails_naming(&missing, "/no/such/image: No such file");
    let unknown = in_store(&store, &["run", "no-such-image:1"]);
    assert_fails_naming(&unknown, "image no-such-image:1: not in the store");
    assert_nothing_half_written(&store);
}

#[test]
fn a_full_disk_during_conversion_leaves_nothing() {
    let images = images();
    let dir = tempdir("full");
    // A 2 MiB tmpfs as the store, in a mount namespace of the test's own
    // (a user namespace too, so that it needs no root).
    let script = r#"mkdir -p "$1"; mount -t tmpfs -o size=2m tmpfs "$1"
        UVM_STORE="$1" "$2" image import "$3" --name localhost/full:1 && exit 9
        find "$1/layers" "$1/images" "$1/tmp" -type f ! -name '*.lock'; exit 0"#;
    let out = run(Command::new("unshare")
        .args(["-rm", "/bin/sh", "-c", script, "sh"])
        .arg(dir.join("store"))
        .arg(env!("CARGO_BIN_EXE_uvm"))
        .arg(&images.docker_archive));
    assert!(
        out.status.success(),
        "the import did not fail: {}",
        stderr(&out)
    );
    assert_eq!(stdout(&out), "", "left in the store");
    let err = stderr(&out);
    assert!(
        err.contains("No space left on device") && !err.contains("panicked"),
        "{err}"
    );
}

/// `uvm run` of an image from a store holding `source` as `name`.
fn run_image(name: &str, source: &Path, args: &[&str]) -> std::process::Output {
    import_and_run(&store(name), name, source, args)
}

/// Imports `source` as `name` into `store` and runs it there, `args`
/// around the word IMAGE.
fn import_and_run(store: &Path, name: &str, source: &Path, args: &[&str]) -> std::process::Output {
    support::require_kvm(name);
    import(store, source, Some(name));
    let mut cmd = uvm();
    cmd.env("UVM_STORE", store).arg("run");
    cmd.args(args.iter().take_while(|a| **a != "IMAGE"));
    cmd.arg(name);
    cmd.args(args.iter().skip_while(|a| **a != "IMAGE").skip(1));
    run(&mut cmd)
}

const LISTING: &str = "/data:\nb\n\n/keep:\ny\n";

#[test]
#[cfg_attr(kvm_missing, ignore = "no usable /dev/kvm on this machine")]
fn an_oci_layout_runs_with_its_config() {
    let out = run_image("localhost/layout-run:1", &images().layout, &["IMAGE"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        stdout(&out),
        format!("1000\n1000 50\n/home/app\nA=1 B=2\n{LISTING}")
    );
}

#[test]
#[cfg_attr(kvm_missing, ignore = "no usable /dev/kvm on this machine")]
fn an_oci_archive_runs_with_flags_over_its_config() {
    let args = ["-u", "4242:77", "-e", "B=3", "-w", "/tmp", "IMAGE"];
    let out = run_image("localhost/archive-run:1", &images().oci_archive, &args);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), format!("4242\n77\n/tmp\nA=1 B=3\n{LISTING}"));
}

#[test]
#[cfg_attr(kvm_missing, ignore = "no usable /dev/kvm on this machine")]
fn a_docker_archive_runs_the_command_given() {
    let out = run_image(
        "localhost/docker-run:1",
        &images().docker_archive,
        &["IMAGE", "/bin/echo", "hi"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "hi\n");
}

/// Debian's docker-registry (the CNCF distribution registry) on a loopback
/// port, stopped when dropped.
struct LocalRegistry {
    child: std::process::Child,
    port: u16,
}

impl LocalRegistry {
    fn start(dir: &Path) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let config = dir.join("registry.yml");
        let storage = dir.join("registry");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n",
                storage.display()
            ),
        )
        .unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("docker-registry (apt-get install docker-registry)");
        let registry = Self { child, port };
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return registry;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        panic!("the registry did not listen on port {port}");
    }
}

impl Drop for LocalRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_pull_from_a_registry_converts_once_and_reuses_every_layer() {
    let dir = tempdir("registry");
    let registry = LocalRegistry::start(&dir);
    let name = format!("localhost:{}/test:1", registry.port);
    let layout = format!("oci:{}:1", images().layout.display());
    sh(
        r#"skopeo --tmpdir "$3" copy -q --dest-tls-verify=false "$1" "docker://$2""#,
        &[Path::new(&layout), Path::new(&name), &dir],
    );
    let store = store("pull");
    let first = in_store(&store, &["pull", &name]);
    assert!(first.status.success(), "{}", stderr(&first));
    assert_eq!(
        stderr(&first).matches("converted").count(),
        2,
        "{}",
        stderr(&first)
    );
    let again = in_store(&store, &["pull", &name]);
    assert!(again.status.success(), "{}", stderr(&again));
    assert_eq!(
        stderr(&again).matches("already stored").count(),
        2,
        "{}",
        stderr(&again)
    );
    assert!(stdout(&in_store(&store, &["images"])).contains(&name));
    let missing = in_store(
        &store,
        &["pull", &format!("localhost:{}/test:2", registry.port)],
    );
    assert_fails_naming(&missing, "manifests/2: not found in the registry");
    assert!(files(&store, "tmp").is_empty());
}

/// The test image with 38 more layers (40 in all): layer 3 of them makes
/// /m/old, layer 20 deletes /l/5, layer 22 makes /m opaque with /m/new.
fn many_layers() -> PathBuf {
    let d = &images().dir;
    let many = d.join("many");
    if !many.exists() {
        sh(
            r#"d=$1; rm -rf "$d/many.tmp"; cp -a "$d/oci" "$d/many.tmp"
            for i in $(seq 1 38); do
                rm -rf "$d/l"; mkdir -p "$d/l/l"; echo $i > "$d/l/l/$i"
                case $i in
                    3) mkdir -p "$d/l/m/old"; echo o > "$d/l/m/old/f";;
                    20) : > "$d/l/l/.wh.5";;
                    22) mkdir -p "$d/l/m"; : > "$d/l/m/.wh..wh..opq"; echo n > "$d/l/m/new";;
                esac
                tar -C "$d/l" -cf "$d/l.tar" l $(test -d "$d/l/m" && echo m)
                umoci raw add-layer --image "$d/many.tmp:1" "$d/l.tar"
            done
            umoci config --image "$d/many.tmp:1" --config.cmd /bin/sh --config.cmd -c \
                --config.cmd 'ls /l | wc -l; cat /l/38; ls /m'
            mv "$d/many.tmp" "$d/many""#,
            &[d],
        );
    }
    many
}

#[test]
#[cfg_attr(kvm_missing, ignore = "no usable /dev/kvm on this machine")]
fn a_40_layer_image_runs_its_bottom_layers_merged() {
    let store = store("many-run");
    let out = import_and_run(&store, "localhost/many:1", &many_layers(), &["IMAGE"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "37\n38\nnew\n");
    assert_eq!(
        layers(&store),
        16,
        "25 bottom layers merged, 15 on their own"
    );
}

#[test]
#[cfg_attr(kvm_missing, ignore = "no usable /dev/kvm on this machine")]
fn a_detached_vm_holds_its_image_until_it_ends() {
    let name = "localhost/detached:1";
    support::require_kvm(name);
    let store = store("detached");
    import(&store, &images().layout, Some(name));
    let state = tempdir("detached-state");
    let uvm_at = |args: &[&str]| {
        let mut cmd = uvm();
        cmd.env("UVM_STORE", &store)
            .arg("--root")
            .arg(&state)
            .args(args);
        run(&mut cmd)
    };
    let started = uvm_at(&[
        "run",
        "-d",
        "--name",
        "held",
        name,
        "/bin/sh",
        "-c",
        "echo up; sleep 600",
    ]);
    assert!(started.status.success(), "{}", stderr(&started));
    assert_fails_naming(&uvm_at(&["rmi", name]), "in use by a running VM");
    assert!(uvm_at(&["stop", "held"]).status.success());
    assert!(stdout(&uvm_at(&["logs", "held"])).contains("up"));
    let removed = uvm_at(&["rmi", name]);
    assert!(removed.status.success(), "{}", stderr(&removed));
    assert_eq!(layers(&store), 0);
    assert!(uvm_at(&["rm", "held"]).status.success());
}

/// Every layer file in the store is a whole ext4 image.
fn assert_layers_whole(store: &Path) {
    for name in files(store, "layers")
        .iter()
        .filter(|n| n.ends_with(".ext4"))
    {
        let out = run(Command::new("e2fsck")
            .arg("-fn")
            .arg(store.join("layers").join(name)));
        assert!(out.status.success(), "{name}: {}", stdout(&out));
    }
}

#[test]
fn a_killed_import_leaves_no_half_layer_and_prune_clears_its_work() {
    let store = store("killed");
    let many = many_layers();
    let mut child = uvm()
        .env("UVM_STORE", &store)
        .args(["image", "import", "--name", "localhost/killed:1"])
        .arg(&many)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Kill it once the first of its 16 layers is stored: mid-import.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while layers(&store) == 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert!(
        child.try_wait().unwrap().is_none(),
        "the import ended before it was killed"
    );
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(layers(&store) < 16, "{:?}", files(&store, "layers"));
    assert_layers_whole(&store);
    assert!(files(&store, "images").iter().all(|f| f.ends_with(".lock")));
    let listed = in_store(&store, &["images"]);
    assert!(!stdout(&listed).contains("killed"), "{}", stdout(&listed));

    assert!(!files(&store, "tmp").is_empty(), "the killed import's work");
    let pruned = in_store(&store, &["image", "prune"]);
    assert!(pruned.status.success(), "{}", stderr(&pruned));
    assert!(
        files(&store, "tmp").is_empty(),
        "{:?}",
        files(&store, "tmp")
    );
    import(&store, &many, Some("localhost/killed:1"));
    assert_eq!(layers(&store), 16);
    assert_layers_whole(&store);
}

#[test]
fn concurrent_imports_of_one_image_store_each_layer_once() {
    let store = store("concurrent");
    let imports: Vec<_> = ["a", "b", "c"]
        .iter()
        .map(|name| {
            uvm()
                .env("UVM_STORE", &store)
                .args(["image", "import", "--name", &format!("localhost/{name}:1")])
                .arg(&images().layout)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    // All three run at once: spawned before any is waited for.
    for child in imports {
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
    }
    assert_eq!(layers(&store), 2, "{:?}", files(&store, "layers"));
    assert_layers_whole(&store);
    assert!(
        files(&store, "tmp").is_empty(),
        "{:?}",
        files(&store, "tmp")
    );
    let listed = stdout(&in_store(&store, &["images"]));
    for name in ["a", "b", "c"] {
        assert!(listed.contains(&format!("localhost/{name}")), "{listed}");
    }
}
