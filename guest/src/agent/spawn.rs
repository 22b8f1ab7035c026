//! Starting a process without copying the agent: the child shares the
//! agent's memory until it executes its program (`clone` with `CLONE_VM |
//! CLONE_VFORK`, as posix_spawn does), so no page table is copied and no
//! page is faulted in as a copy. On PVM hosts, where each of those traps
//! to the host, a fork of the agent costs ~0.5 s and this ~0.1 s.
//!
//! Everything the child needs (its command line, environment, the paths to
//! try, its setup steps) is made before it exists: in between, it only
//! makes system calls, while the agent waits for it to execute or fail.

use std::ffi::{c_void, CString};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicI32, Ordering};

use crate::check;

/// The child's stack: its setup steps are plain system calls.
const STACK: usize = 256 * 1024;

/// A step the child takes before it executes the program: entering the
/// container, changing user, taking its terminal.
pub type Step = Box<dyn Fn() -> io::Result<()>>;

/// A process to start.
pub struct Spawn {
    argv: Vec<CString>,
    env: Vec<CString>,
    /// The program itself if it names a path, else each `PATH` directory
    /// joined with it, tried in order by the child once it is in its root.
    candidates: Vec<CString>,
    /// The program, open, when it is not found by its name.
    program: Option<OwnedFd>,
    stdio: [OwnedFd; 3],
    steps: Vec<Step>,
}

/// What the child reads and writes of the agent's memory.
struct Shared<'a> {
    spawn: &'a Spawn,
    argv: Vec<*const libc::c_char>,
    env: Vec<*const libc::c_char>,
    /// The error that kept the child from executing its program.
    errno: AtomicI32,
}

impl Spawn {
    /// `argv` with `env` (`KEY=VALUE`; its `PATH` finds the program) and
    /// `stdio` as descriptors 0, 1 and 2.
    pub fn new(argv: &[String], env: Vec<String>, stdio: [OwnedFd; 3]) -> io::Result<Self> {
        let [stdin, stdout, stderr] = stdio;
        let program = argv
            .first()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "empty command"))?;
        let path = env
            .iter()
            .rev()
            .find_map(|entry| entry.strip_prefix("PATH="))
            .unwrap_or_default();
        let candidates: Vec<String> = match program.contains('/') {
            true => vec![program.clone()],
            false => path
                .split(':')
                .filter(|dir| !dir.is_empty())
                .map(|dir| format!("{dir}/{program}"))
                .collect(),
        };
        let cstrings = |strings: Vec<String>| -> io::Result<Vec<CString>> {
            strings.into_iter().map(crate::root::cstring).collect()
        };
        Ok(Self {
            argv: cstrings(argv.to_vec())?,
            env: cstrings(env)?,
            candidates: cstrings(candidates)?,
            program: None,
            stdio: [
                above_stdio(stdin)?,
                above_stdio(stdout)?,
                above_stdio(stderr)?,
            ],
            steps: Vec::new(),
        })
    }

    /// Executes `program` (opened with `O_PATH`) instead of the program
    /// the command line names: one the child's root may not hold.
    pub fn program(&mut self, program: OwnedFd) {
        self.program = Some(program);
    }

    /// Adds a step the child takes, after its stdio is in place.
    pub fn step(&mut self, step: Step) {
        self.steps.push(step);
    }

    /// Starts the process; returns once it executes its program, or with
    /// the error that kept it from doing so.
    pub fn spawn(&self) -> io::Result<libc::pid_t> {
        let nul_ended = |strings: &[CString]| {
            let mut pointers: Vec<_> = strings.iter().map(|s| s.as_ptr()).collect();
            pointers.push(std::ptr::null());
            pointers
        };
        let shared = Shared {
            spawn: self,
            argv: nul_ended(&self.argv),
            env: nul_ended(&self.env),
            errno: AtomicI32::new(0),
        };
        let mut stack = vec![0u8; STACK];
        // The stack grows down from its (16-byte aligned) end.
        let top = (stack.as_mut_ptr() as usize + STACK) & !15;
        let mut all = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
        let mut old = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
        // SAFETY: the sets are valid storage; blocking every signal keeps
        // the agent's handlers from running in the child, on its memory.
        unsafe {
            libc::sigfillset(all.as_mut_ptr());
            libc::sigprocmask(libc::SIG_SETMASK, all.as_ptr(), old.as_mut_ptr());
        }
        // SAFETY: `child` gets a pointer to `shared`, which outlives it:
        // with CLONE_VFORK this thread waits until the child has executed
        // its program or exited, and the child's stack is `stack`.
        let pid = unsafe {
            libc::clone(
                child,
                top as *mut c_void,
                libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
                &shared as *const Shared as *mut c_void,
            )
        };
        let cloned = io::Error::last_os_error();
        // SAFETY: `old` was filled by the call above.
        unsafe { libc::sigprocmask(libc::SIG_SETMASK, old.as_ptr(), std::ptr::null_mut()) };
        if pid < 0 {
            return Err(cloned);
        }
        match shared.errno.load(Ordering::SeqCst) {
            0 => Ok(pid),
            errno => {
                // SAFETY: reaps the child that exited; no memory is passed.
                unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
                Err(io::Error::from_raw_os_error(errno))
            }
        }
    }
}

/// A descriptor the child can move to 0, 1 or 2 without overwriting
/// another one it still needs.
fn above_stdio(fd: OwnedFd) -> io::Result<OwnedFd> {
    if fd.as_raw_fd() > 2 {
        return Ok(fd);
    }
    // SAFETY: plain system call on a descriptor we own.
    let new = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 3) };
    check(new)?;
    // SAFETY: a new descriptor that nothing else owns.
    Ok(unsafe { std::os::fd::FromRawFd::from_raw_fd(new) })
}

/// The child: stdio, signals as a new program expects them, the steps,
/// then the program. It reports why it could not execute in `errno`.
extern "C" fn child(arg: *mut c_void) -> libc::c_int {
    // SAFETY: `spawn` passed a pointer to a `Shared` it keeps alive until
    // this child has executed or exited.
    let shared = unsafe { &*(arg as *const Shared) };
    let errno = match prepare(shared.spawn) {
        Ok(()) => execute(shared),
        Err(e) => e.raw_os_error().unwrap_or(libc::EINVAL),
    };
    shared.errno.store(errno, Ordering::SeqCst);
    // SAFETY: ends the child without running anything of the agent's.
    unsafe { libc::_exit(127) }
}

fn prepare(spawn: &Spawn) -> io::Result<()> {
    for (fd, target) in spawn.stdio.iter().zip(0..) {
        move_to(fd.as_raw_fd(), target)?;
    }
    // SAFETY: plain system calls on valid storage. The agent ignores
    // SIGPIPE (Rust's runtime does); a new program starts with the
    // default and no signal blocked.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        let mut none = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
        libc::sigemptyset(none.as_mut_ptr());
        check(libc::sigprocmask(
            libc::SIG_SETMASK,
            none.as_ptr(),
            std::ptr::null_mut(),
        ))?;
    }
    spawn.steps.iter().try_for_each(|step| step())
}

fn move_to(fd: RawFd, target: RawFd) -> io::Result<()> {
    // SAFETY: plain system call; dup2 clears close-on-exec on the copy.
    check(unsafe { libc::dup2(fd, target) })
}

/// Tries each candidate path; the error execvp would report if none runs
/// (permission denied if any was found but not executable).
fn execute(shared: &Shared) -> libc::c_int {
    if let Some(program) = &shared.spawn.program {
        // SAFETY: as for execve below, with an empty path that names the
        // open program itself.
        unsafe {
            libc::syscall(
                libc::SYS_execveat,
                program.as_raw_fd(),
                c"".as_ptr(),
                shared.argv.as_ptr(),
                shared.env.as_ptr(),
                libc::AT_EMPTY_PATH,
            )
        };
        return io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::ENOENT);
    }
    let mut errno = libc::ENOENT;
    for path in &shared.spawn.candidates {
        // SAFETY: the arrays are NUL-terminated arrays of pointers to
        // strings that `shared.spawn` owns; execve returns only on failure.
        unsafe { libc::execve(path.as_ptr(), shared.argv.as_ptr(), shared.env.as_ptr()) };
        let e = io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::ENOENT);
        if errno != libc::EACCES {
            errno = e;
        }
    }
    errno
}

#[cfg(test)]
mod tests {
    use std::fs::File;
    use std::io::Read;

    use super::*;

    /// Runs `argv` with `env` and `steps`, and returns its exit status and
    /// output, or the error that kept it from starting.
    fn run(argv: &[&str], env: &[&str], steps: Vec<Step>) -> io::Result<(i32, String)> {
        let (mut out, out_end) = std::io::pipe().unwrap();
        let stdio = [
            File::open("/dev/null").unwrap().into(),
            OwnedFd::from(out_end.try_clone().unwrap()),
            OwnedFd::from(out_end),
        ];
        let argv: Vec<String> = argv.iter().map(|s| s.to_string()).collect();
        let env = env.iter().map(|s| s.to_string()).collect();
        let mut spawn = Spawn::new(&argv, env, stdio)?;
        for step in steps {
            spawn.step(step);
        }
        let pid = spawn.spawn();
        drop(spawn); // the agent's copies of the child's stdio
        let pid = pid?;
        let mut output = String::new();
        out.read_to_string(&mut output).unwrap();
        let mut status = 0;
        // SAFETY: `status` is valid storage for the call.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        Ok((libc::WEXITSTATUS(status), output))
    }

    #[test]
    fn a_child_gets_its_command_environment_stdio_and_steps() {
        let cwd = CString::new("/tmp").unwrap();
        // SAFETY: plain system call on a NUL-terminated string.
        let chdir: Step = Box::new(move || check(unsafe { libc::chdir(cwd.as_ptr()) }));
        let (code, output) = run(
            &["sh", "-c", "echo $A; pwd; echo err >&2; exit 3"],
            &["PATH=/nonexistent:/bin:/usr/bin", "A=1"],
            vec![chdir],
        )
        .unwrap();
        assert_eq!((code, output.as_str()), (3, "1\n/tmp\nerr\n"));
    }

    #[test]
    fn what_keeps_a_child_from_running_is_the_spawns_error() {
        let missing = run(&["no-such-program"], &["PATH=/bin"], Vec::new()).unwrap_err();
        assert_eq!(missing.kind(), io::ErrorKind::NotFound);
        let not_executable = run(&["/etc/passwd"], &[], Vec::new()).unwrap_err();
        assert_eq!(not_executable.kind(), io::ErrorKind::PermissionDenied);
        let failing: Step = Box::new(|| Err(io::Error::from_raw_os_error(libc::EPERM)));
        let refused = run(&["/bin/true"], &[], vec![failing]).unwrap_err();
        assert_eq!(refused.raw_os_error(), Some(libc::EPERM));
        assert!(Spawn::new(&[], Vec::new(), stdio_null()).is_err());
    }

    #[test]
    fn an_open_program_runs_in_place_of_the_named_one() {
        let argv = ["not-sh".to_string(), "-c".into(), "echo $0".into()];
        let (mut out, out_end) = std::io::pipe().unwrap();
        let stdio = [
            File::open("/dev/null").unwrap().into(),
            OwnedFd::from(out_end.try_clone().unwrap()),
            OwnedFd::from(out_end),
        ];
        let mut spawn = Spawn::new(&argv, Vec::new(), stdio).unwrap();
        spawn.program(crate::hooks::open_path("/bin/sh").unwrap());
        let pid = spawn.spawn().unwrap();
        drop(spawn);
        let mut output = String::new();
        out.read_to_string(&mut output).unwrap();
        // SAFETY: reaps the child; no memory is passed.
        unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
        assert_eq!(output, "not-sh\n");
    }

    fn stdio_null() -> [OwnedFd; 3] {
        [(); 3].map(|()| File::open("/dev/null").unwrap().into())
    }
}
