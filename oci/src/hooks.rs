//! The bundle's hooks. prestart, createRuntime, createContainer, poststart
//! and poststop run on the host with the container's state on their stdin,
//! within their timeouts; createContainer too, as Kata runs it: its path is
//! the host's, and the VM is the container's namespace. startContainer
//! hooks (paths in the container) go to the VM, where the agent runs them
//! just before the process.

use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;

/// A hook without a timeout may take this long before it counts as hung.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);

/// `hooks` as the VM's agent or [`run`] takes them, with `state` as input.
pub fn with_state(hooks: &[oci_spec::runtime::Hook], state: &str) -> Vec<guest::protocol::Hook> {
    let timeout = |hook: &oci_spec::runtime::Hook| {
        hook.timeout()
            .filter(|&t| t > 0)
            .map_or(DEFAULT_TIMEOUT.as_secs(), |t| t as u64)
    };
    hooks
        .iter()
        .map(|hook| guest::protocol::Hook {
            path: hook.path().display().to_string(),
            args: hook.args().clone().unwrap_or_default(),
            env: hook.env().clone().unwrap_or_default(),
            timeout_secs: timeout(hook),
            input: state.to_string(),
        })
        .collect()
}

/// Runs `hooks` on the host in order; the first that fails (or times out)
/// stops them.
pub fn run(kind: &str, hooks: &[oci_spec::runtime::Hook], state: &str) -> anyhow::Result<()> {
    for hook in with_state(hooks, state) {
        guest::hook::run(&hook, Stdio::null())
            .with_context(|| format!("{kind} hook {}", hook.path))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use oci_spec::runtime::Hook;

    use super::*;

    fn hook(script: &str, timeout: Option<i64>) -> Hook {
        let mut hook = Hook::default();
        hook.set_path("/bin/sh".into());
        hook.set_args(Some(vec!["sh".into(), "-c".into(), script.into()]));
        hook.set_env(Some(vec!["OUT=x".into()]));
        hook.set_timeout(timeout);
        hook
    }

    #[test]
    fn hooks_get_the_state_and_their_failures_and_hangs_are_errors() {
        let out = std::env::temp_dir().join(format!("uvm-oci-hook-{}", std::process::id()));
        let script = format!("cat > {}; test \"$OUT\" = x", out.display());
        run("poststart", &[hook(&script, None)], "{\"id\":\"c\"}").unwrap();
        assert_eq!(std::fs::read_to_string(&out).unwrap(), "{\"id\":\"c\"}");
        std::fs::remove_file(&out).unwrap();
        let e = run("prestart", &[hook("exit 3", None)], "{}").unwrap_err();
        assert!(format!("{e:#}").contains("prestart hook /bin/sh"), "{e:#}");
        let e = run("poststop", &[hook("sleep 5", Some(1))], "{}").unwrap_err();
        assert!(format!("{e:#}").contains("within 1 s"), "{e:#}");
    }

    #[test]
    fn hooks_for_the_vm_carry_the_state_and_a_timeout() {
        let hooks = with_state(&[hook("true", None), hook("true", Some(7))], "{}");
        assert_eq!(hooks[0].timeout_secs, DEFAULT_TIMEOUT.as_secs());
        assert_eq!(hooks[1].timeout_secs, 7);
        assert_eq!(
            (hooks[0].path.as_str(), hooks[0].input.as_str()),
            ("/bin/sh", "{}")
        );
        assert_eq!(hooks[0].args, ["sh", "-c", "true"]);
        assert_eq!(hooks[0].env, ["OUT=x"]);
    }
}
