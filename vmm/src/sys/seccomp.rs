//! seccomp filters, one per kind of VMM thread (Firecracker's model): a
//! thread may make only the system calls its work needs, and any other
//! call kills the whole VMM with SIGSYS. The filters are data, reviewed
//! like code: each group says which thread needs it and why.
//!
//! A thread installs its filter before it does its work (vCPUs before the
//! guest's first instruction, the main thread when it releases them); a
//! thread started by another inherits the starter's filter too, so every
//! thread is started by one of its own kind or before its starter is
//! confined. `uvm run --no-seccomp` turns them off; with
//! `UVM_SECCOMP=log` a forbidden call is only logged by the kernel (the
//! audit lines in dmesg name the thread and the call), to find what a new
//! feature needs.

use std::cell::Cell;
use std::collections::{BTreeMap, HashMap};
use std::io;
use std::sync::OnceLock;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

use crate::vm::threads::ThreadKind;

/// The compiled filters, once [`enable`] has run; no filters before.
static FILTERS: OnceLock<Filters> = OnceLock::new();

thread_local! {
    /// The filter this thread runs under (its own, or its starter's).
    static CONFINED: Cell<Option<ThreadKind>> = const { Cell::new(None) };
}

struct Filters {
    programs: HashMap<ThreadKind, BpfProgram>,
    /// Debug builds: the kind whose threads make a forbidden call right
    /// after they are confined (`UVM_SECCOMP_TRIGGER`), for the tests.
    trigger: Option<ThreadKind>,
}

/// What a forbidden call does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Kill,
    /// Allowed, and logged by the kernel.
    Log,
}

impl Mode {
    /// `UVM_SECCOMP=log` asks for [`Mode::Log`].
    pub fn from_env() -> Self {
        match std::env::var("UVM_SECCOMP").as_deref() {
            Ok("log") => Mode::Log,
            _ => Mode::Kill,
        }
    }
}

/// Compiles every filter and turns confinement on for this process: each
/// VMM thread started from now on, and the main thread when it releases
/// the vCPUs, runs under its kind's filter.
pub fn enable(mode: Mode) -> io::Result<()> {
    settle_allocator()?;
    let mismatch = match mode {
        Mode::Kill => SeccompAction::KillProcess,
        Mode::Log => SeccompAction::Log,
    };
    let mut programs = HashMap::new();
    for kind in ThreadKind::ALL {
        programs.insert(
            kind,
            compile(kind, mismatch.clone()).map_err(io::Error::other)?,
        );
    }
    let filters = Filters {
        programs,
        trigger: trigger(),
    };
    FILTERS
        .set(filters)
        .map_err(|_| io::Error::other("seccomp filters enabled twice"))
}

/// glibc's malloc opens a file the first time it needs to know something,
/// from whichever thread happens to allocate or free then: the CPU count
/// (/sys/devices/system/cpu/online) for a ninth arena, the overcommit mode
/// (/proc/sys/vm/overcommit_memory) when a thread arena's heap first
/// shrinks. No filter allows that open, and when it fell on the event thread
/// it killed the VMM. A fixed arena count and no trimming mean malloc never
/// asks.
#[cfg(target_env = "gnu")]
fn settle_allocator() -> io::Result<()> {
    /// What glibc picks on a one-CPU host; uvm's threads allocate little.
    const ARENAS: libc::c_int = 8;
    for (param, value) in [(M_ARENA_MAX, ARENAS), (M_TRIM_THRESHOLD, c_int::MAX)] {
        // SAFETY: mallopt only sets one of malloc's parameters.
        if unsafe { libc::mallopt(param, value) } != 1 {
            return Err(io::Error::other(format!("mallopt({param}) failed")));
        }
    }
    Ok(())
}

/// musl's malloc opens nothing.
#[cfg(not(target_env = "gnu"))]
fn settle_allocator() -> io::Result<()> {
    Ok(())
}

/// The kind of filter the calling thread runs under, for the threads it
/// starts (they inherit it).
pub fn confined() -> Option<ThreadKind> {
    CONFINED.get()
}

/// Confines the calling thread, which inherited `inherited`'s filter from
/// its starter, to `kind`'s system calls. Nothing to do when filters are
/// off or the inherited filter is this kind's.
pub fn confine(kind: ThreadKind, inherited: Option<ThreadKind>) -> io::Result<()> {
    CONFINED.set(inherited);
    let Some(filters) = FILTERS.get() else {
        return Ok(());
    };
    if inherited != Some(kind) {
        seccompiler::apply_filter(&filters.programs[&kind]).map_err(io::Error::other)?;
        CONFINED.set(Some(kind));
    }
    if filters.trigger == Some(kind) {
        forbidden_call();
    }
    Ok(())
}

#[cfg(debug_assertions)]
fn trigger() -> Option<ThreadKind> {
    let name = std::env::var("UVM_SECCOMP_TRIGGER").ok()?;
    ThreadKind::ALL.into_iter().find(|k| k.name() == name)
}

#[cfg(not(debug_assertions))]
fn trigger() -> Option<ThreadKind> {
    None
}

/// A call no filter allows: with filters on, the VMM dies here.
fn forbidden_call() {
    // SAFETY: acct(NULL) takes no memory; it only switches process
    // accounting off, and the filter stops it before it runs.
    unsafe { libc::syscall(libc::SYS_acct, std::ptr::null::<libc::c_char>()) };
}

fn compile(kind: ThreadKind, mismatch: SeccompAction) -> seccompiler::Result<BpfProgram> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    let mut unconditional = Vec::new();
    for (calls, conditions) in allowed(kind) {
        for &call in calls {
            let entry = rules.entry(call).or_default();
            match conditions {
                Conditions::Any => unconditional.push(call),
                Conditions::Ioctls(requests) => {
                    for &request in requests {
                        entry.push(ioctl_rule(request)?);
                    }
                }
            }
        }
    }
    // No rules means any arguments.
    for call in unconditional {
        rules.insert(call, Vec::new());
    }
    let arch = TargetArch::try_from(std::env::consts::ARCH)?;
    let filter = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, arch)?;
    Ok(filter.try_into()?)
}

fn ioctl_rule(request: u64) -> seccompiler::Result<SeccompRule> {
    let request = SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, request)?;
    Ok(SeccompRule::new(vec![request])?)
}

/// Which arguments a group's calls may have.
enum Conditions {
    Any,
    /// `ioctl` with one of these requests.
    Ioctls(&'static [u64]),
}

type Group = (&'static [i64], Conditions);

use libc::*;

/// ioctl request numbers (asm-generic/ioctl.h encoding, KVMIO = 0xAE).
mod ioctl {
    const fn io(ty: u64, nr: u64) -> u64 {
        (ty << 8) | nr
    }
    const fn ior(ty: u64, nr: u64, size: u64) -> u64 {
        (2 << 30) | (size << 16) | (ty << 8) | nr
    }
    const fn iowr(ty: u64, nr: u64, size: u64) -> u64 {
        (3 << 30) | (size << 16) | (ty << 8) | nr
    }
    /// `_IOR(KVMIO, nr, T)`.
    const fn kvm_get<T>(nr: u64) -> u64 {
        ior(0xAE, nr, std::mem::size_of::<T>() as u64)
    }
    use kvm_bindings::*;
    pub const KVM_RUN: u64 = io(0xAE, 0x80);
    pub const KVM_GET_REGS: u64 = kvm_get::<kvm_regs>(0x81);
    /// What saving a vCPU reads besides its registers (hypervisor/kvm/state.rs).
    pub const KVM_SAVE: &[u64] = &[
        KVM_RUN,
        KVM_GET_REGS,
        io(0xAE, 0xa3), // KVM_GET_TSC_KHZ
        kvm_get::<kvm_mp_state>(0x98),
        kvm_get::<kvm_sregs>(0x83),
        kvm_get::<kvm_xsave>(0xa4),
        kvm_get::<kvm_xcrs>(0xa6),
        kvm_get::<kvm_debugregs>(0xa1),
        kvm_get::<kvm_lapic_state>(0x8e),
        iowr(0xAE, 0x88, std::mem::size_of::<kvm_msrs>() as u64), // KVM_GET_MSRS
        kvm_get::<kvm_vcpu_events>(0x9f),
    ];
    /// What saving the VM itself reads (vm/mod.rs `save`, on the thread
    /// that owns the VM).
    pub const KVM_SAVE_VM: &[u64] = &[
        iowr(0xAE, 0x62, std::mem::size_of::<kvm_irqchip>() as u64), // KVM_GET_IRQCHIP
        kvm_get::<kvm_pit_state2>(0x9f),
        kvm_get::<kvm_clock_data>(0x7c),
    ];
    pub const TCGETS: u64 = 0x5401;
    pub const TCSETS: u64 = 0x5402;
    pub const TIOCGWINSZ: u64 = 0x5413;
    pub const FIONBIO: u64 = 0x5421;
}

/// Every thread: Rust's runtime (allocation, locks, thread exit, panics
/// and their messages), logging to stderr, closing what it drops.
const RUNTIME: &[i64] = &[
    SYS_brk,
    SYS_mmap,
    SYS_munmap,
    SYS_mremap,
    SYS_mprotect,
    SYS_madvise,
    SYS_futex,
    SYS_sched_yield,
    SYS_rt_sigprocmask,
    SYS_rt_sigreturn,
    SYS_sigaltstack,
    SYS_getrandom,
    SYS_clock_gettime,
    SYS_clock_nanosleep,
    SYS_nanosleep,
    SYS_gettid,
    SYS_getpid,
    // Kicking a vCPU, abort(): glibc uses tgkill, musl tkill.
    SYS_tgkill,
    SYS_tkill,
    SYS_write,
    SYS_writev,
    SYS_close,
    // Debug builds check that a dropped descriptor is open (F_GETFD).
    SYS_fcntl,
    SYS_exit,
    SYS_exit_group,
];

/// Starting threads (glibc's and musl's way) and naming them.
const SPAWN: &[i64] = &[
    SYS_clone,
    SYS_clone3,
    SYS_set_robust_list,
    SYS_rseq,
    SYS_prctl,
    SYS_sched_getaffinity,
];

/// Reading and writing Unix streams (std reads and writes sockets with
/// recvfrom/sendto) and pipes.
const STREAMS: &[i64] = &[SYS_read, SYS_recvfrom, SYS_sendto, SYS_shutdown];

fn allowed(kind: ThreadKind) -> Vec<Group> {
    let mut groups: Vec<Group> = vec![(RUNTIME, Conditions::Any)];
    groups.extend(match kind {
        // The guest's port and MMIO accesses are answered in memory; queue
        // notifications and interrupts are eventfd writes (RUNTIME), and
        // device work a driver asks for (even at activation) is served on
        // the event thread.
        ThreadKind::Vcpu => vec![(
            &[SYS_ioctl][..],
            // Running the vCPU; its registers for a fault's report, its
            // whole state for a snapshot (read on its own thread).
            Conditions::Ioctls(ioctl::KVM_SAVE),
        )],
        ThreadKind::Devices => vec![
            // The event loop and the vsock connection timer.
            (
                &[
                    SYS_epoll_wait,
                    SYS_epoll_pwait,
                    SYS_epoll_ctl,
                    SYS_timerfd_settime,
                ][..],
                Conditions::Any,
            ),
            // vsock: host streams, socket pairs for the ports served inside
            // the VMM, `{uds}_{port}` connections, hybrid-socket clients.
            (STREAMS, Conditions::Any),
            (
                &[SYS_socketpair, SYS_socket, SYS_connect, SYS_accept4][..],
                Conditions::Any,
            ),
            (&[SYS_ioctl][..], Conditions::Ioctls(&[ioctl::FIONBIO])),
            // virtio-blk on the scratch file.
            (
                &[
                    SYS_pread64,
                    SYS_pwrite64,
                    SYS_preadv,
                    SYS_pwritev,
                    SYS_lseek,
                    SYS_fsync,
                    SYS_fdatasync,
                ][..],
                Conditions::Any,
            ),
            // virtio-fs: fuse-backend-rs's passthrough file system, on the
            // shared directories, by descriptor (openat from the inodes'
            // O_PATH descriptors and /proc/self/fd), creating as the
            // guest's caller (setresuid/setresgid on this thread alone)
            // with its umask.
            (
                &[
                    SYS_openat,
                    SYS_newfstatat,
                    SYS_fstat,
                    SYS_statx,
                    SYS_fstatfs,
                    SYS_getdents64,
                    SYS_readlinkat,
                    SYS_mkdirat,
                    SYS_mknodat,
                    SYS_symlinkat,
                    SYS_linkat,
                    SYS_unlinkat,
                    SYS_renameat2,
                    SYS_fchmod,
                    SYS_fchmodat,
                    SYS_fchownat,
                    SYS_utimensat,
                    SYS_ftruncate,
                    SYS_fallocate,
                    SYS_dup,
                    SYS_setresuid,
                    SYS_setresgid,
                    SYS_umask,
                ][..],
                Conditions::Any,
            ),
        ],
        // The control stream and the stdio streams; stdin forwarding waits
        // with poll.
        ThreadKind::Agent => vec![
            (SPAWN, Conditions::Any),
            (STREAMS, Conditions::Any),
            (&[SYS_poll, SYS_ppoll][..], Conditions::Any),
        ],
        // Clients of the control socket (accepted with a timeout), their
        // requests and the stream sockets passed back with SCM_RIGHTS.
        ThreadKind::Control => vec![
            (SPAWN, Conditions::Any),
            (STREAMS, Conditions::Any),
            (
                &[
                    SYS_accept4,
                    SYS_poll,
                    SYS_ppoll,
                    SYS_recvmsg,
                    SYS_sendmsg,
                    SYS_setsockopt,
                ][..],
                Conditions::Any,
            ),
            (&[SYS_ioctl][..], Conditions::Ioctls(&[ioctl::FIONBIO])),
        ],
        ThreadKind::Main => vec![
            // Forwarded signals, sent to the agent on its control stream;
            // a terminal's size for SIGWINCH and the host terminal restored
            // at the end.
            (STREAMS, Conditions::Any),
            (&[SYS_rt_sigtimedwait][..], Conditions::Any),
            (
                &[SYS_ioctl][..],
                Conditions::Ioctls(&[ioctl::TCGETS, ioctl::TCSETS, ioctl::TIOCGWINSZ]),
            ),
            // `uvm snapshot`: the VM's interrupt controllers, timer and clock.
            (&[SYS_ioctl][..], Conditions::Ioctls(ioctl::KVM_SAVE_VM)),
            // The VM's state directory: the record rewritten (atomically),
            // removed at the end; the VMM's memory read from smaps for the
            // report. glibc and musl spell some of these differently.
            (
                &[
                    SYS_open,
                    SYS_openat,
                    SYS_stat,
                    SYS_lstat,
                    SYS_fstat,
                    SYS_newfstatat,
                    SYS_statx,
                    SYS_lseek,
                    SYS_rename,
                    SYS_renameat,
                    SYS_unlink,
                    SYS_unlinkat,
                    SYS_rmdir,
                    SYS_getdents64,
                    SYS_flock,
                ][..],
                Conditions::Any,
            ),
            // `uvm snapshot` of a VM in the background (state/snapshot.rs):
            // its directory made, the inputs' paths resolved (glibc checks
            // a directory before a `..` with faccessat) and digests kept,
            // memory and state written, the scratch disk copied.
            (
                &[
                    SYS_mkdir,
                    SYS_mkdirat,
                    SYS_readlink,
                    SYS_readlinkat,
                    SYS_faccessat,
                    SYS_faccessat2,
                    SYS_getcwd,
                    SYS_pwrite64,
                    SYS_ftruncate,
                    SYS_fsync,
                    SYS_copy_file_range,
                ][..],
                Conditions::Any,
            ),
        ],
    });
    groups
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_filter_compiles() {
        for kind in ThreadKind::ALL {
            let program = compile(kind, SeccompAction::KillProcess).unwrap();
            assert!(!program.is_empty(), "{kind:?}");
        }
    }

    /// Threads under the event thread's filter allocate and free as the
    /// VMM's do, all at once (more threads than glibc makes arenas for
    /// before it counts CPUs) and in blocks large enough that freeing them
    /// shrinks a thread's heap. In a child process: a forbidden call kills
    /// the whole process.
    #[test]
    fn confined_threads_allocate_and_free_without_forbidden_calls() {
        const CHILD: &str = "UVM_SECCOMP_TEST_CHILD";
        if std::env::var_os(CHILD).is_some() {
            return allocate_and_free_confined();
        }
        let path = module_path!().split_once("::").unwrap().1;
        let name = format!("{path}::confined_threads_allocate_and_free_without_forbidden_calls");
        let status = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", &name, "--test-threads=1"])
            .env(CHILD, "1")
            .stdout(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "the confined child: {status}");
    }

    fn allocate_and_free_confined() {
        const THREADS: usize = 16;
        enable(Mode::Kill).unwrap();
        let all_started = std::sync::Arc::new(std::sync::Barrier::new(THREADS));
        let threads: Vec<_> = (0..THREADS)
            .map(|_| {
                let all_started = all_started.clone();
                std::thread::spawn(move || {
                    confine(ThreadKind::Devices, None).unwrap();
                    all_started.wait();
                    let blocks: Vec<Vec<u8>> = (0..32).map(|_| vec![1; 100 << 10]).collect();
                    drop(blocks);
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
    }

    #[test]
    fn ioctl_numbers_match_the_kernel_headers() {
        assert_eq!(ioctl::KVM_RUN, 0xae80);
        assert_eq!(ioctl::KVM_GET_REGS, 0x8090_ae81);
        // From <linux/kvm.h> as the compiler computes them.
        let save = [
            0xae80,
            0x8090_ae81,
            0xaea3,
            0x8004_ae98,
            0x8138_ae83,
            0x9000_aea4,
            0x8188_aea6,
            0x8080_aea1,
            0x8400_ae8e,
            0xc008_ae88,
            0x8040_ae9f,
        ];
        assert_eq!(ioctl::KVM_SAVE, save);
        assert_eq!(ioctl::KVM_SAVE_VM, [0xc208_ae62, 0x8070_ae9f, 0x8030_ae7c]);
        assert_eq!(ioctl::FIONBIO, libc::FIONBIO);
        assert_eq!(ioctl::TIOCGWINSZ, libc::TIOCGWINSZ);
    }
}
