//! The container's startContainer hooks. They run in the container, after
//! it is set up and just before its program, as runc's do: the main
//! process enters the container as usual, then executes the agent again
//! (named [`ARGV0`]) instead of its program; that runs each hook and then
//! executes the program in its place.

use std::io::{self, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::process::Command;

use guest::protocol::Hook;
use serde::{Deserialize, Serialize};

/// `argv[0]` of the agent executed to run the hooks.
pub const ARGV0: &str = "uvm-hooks";

/// The status the container ends with when a hook fails (as for other
/// failures to set the container up).
const FAILED: i32 = 125;

/// What the re-executed agent is told: its only argument.
#[derive(Serialize, Deserialize)]
struct Plan {
    hooks: Vec<Hook>,
    argv: Vec<String>,
}

/// The command line that runs `hooks`, then `argv`.
pub fn command_line(hooks: &[Hook], argv: &[String]) -> io::Result<Vec<String>> {
    let plan = Plan {
        hooks: hooks.to_vec(),
        argv: argv.to_vec(),
    };
    Ok(vec![ARGV0.into(), serde_json::to_string(&plan)?])
}

/// The agent's own program, for the child to execute once it is in the
/// container (where the agent's files are out of reach).
pub fn agent_program() -> io::Result<OwnedFd> {
    open_path("/proc/self/exe")
}

/// `path` opened to be executed (`O_PATH`), not read.
pub fn open_path(path: &str) -> io::Result<OwnedFd> {
    let file = std::fs::File::options()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_CLOEXEC)
        .open(path)?;
    Ok(file.into())
}

/// The re-executed agent: runs the hooks, then executes the program (found
/// on this environment's `PATH`). Returns only on failure, with the status
/// to exit with.
pub fn main(plan: &str) -> i32 {
    let plan: Plan = match serde_json::from_str(plan) {
        Ok(plan) => plan,
        Err(e) => return fail(&format!("the hooks' plan: {e}"), FAILED),
    };
    for hook in &plan.hooks {
        let output = io::stderr().as_fd().try_clone_to_owned();
        if let Err(e) = output.and_then(|stderr| guest::hook::run(hook, stderr)) {
            return fail(&format!("startContainer hook {}: {e}", hook.path), FAILED);
        }
    }
    let Some((program, args)) = plan.argv.split_first() else {
        return fail("empty command", FAILED);
    };
    let e = Command::new(program).args(args).exec();
    fail(&format!("{program}: {e}"), crate::process::exec_status(&e))
}

fn fail(message: &str, status: i32) -> i32 {
    let _ = writeln!(io::stderr(), "uvm-agent: {message}");
    status
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hook(script: &str) -> Hook {
        Hook {
            path: "/bin/sh".into(),
            args: vec!["sh".into(), "-c".into(), script.into()],
            env: vec!["A=1".into()],
            timeout_secs: 5,
            input: "state".into(),
        }
    }

    fn plan(hooks: Vec<Hook>, argv: &[&str]) -> String {
        let argv: Vec<String> = argv.iter().map(|s| s.to_string()).collect();
        command_line(&hooks, &argv).unwrap().pop().unwrap()
    }

    #[test]
    fn hooks_run_in_order_with_their_input_and_a_failure_stops_them() {
        let out = std::env::temp_dir().join(format!("uvm-agent-hooks-{}", std::process::id()));
        let out = out.display();
        let first = hook(&format!("cat > {out}; echo \" $A\" >> {out}"));
        let second = hook(&format!("echo second >> {out}"));
        // Past the hooks, the program is missing: main returns instead of
        // executing it.
        assert_eq!(main(&plan(vec![first, second], &["/nonexistent"])), 127);
        assert_eq!(
            std::fs::read_to_string(out.to_string()).unwrap(),
            "state 1\nsecond\n"
        );
        let failing = hook("exit 3");
        let never = hook(&format!("echo never >> {out}"));
        assert_eq!(main(&plan(vec![failing, never], &["/bin/true"])), FAILED);
        assert!(!std::fs::read_to_string(out.to_string())
            .unwrap()
            .contains("never"));
        std::fs::remove_file(out.to_string()).unwrap();
        assert_eq!(main("{"), FAILED);
    }
}
