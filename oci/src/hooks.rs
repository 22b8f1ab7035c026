//! The bundle's host hooks (prestart, createRuntime, poststart, poststop):
//! each runs on the host with the container's state on its stdin, within
//! its timeout.

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use oci_spec::runtime::Hook;

/// A hook without a timeout may take this long before it counts as hung.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);

/// Runs `hooks` in order; the first that fails (or times out) stops them.
pub fn run(kind: &str, hooks: &[Hook], state: &str) -> anyhow::Result<()> {
    for hook in hooks {
        run_one(hook, state).with_context(|| format!("{kind} hook {}", hook.path().display()))?;
    }
    Ok(())
}

fn run_one(hook: &Hook, state: &str) -> anyhow::Result<()> {
    let args = hook.args().clone().unwrap_or_default();
    let mut command = Command::new(hook.path());
    if let Some((first, rest)) = args.split_first() {
        command.arg0(first).args(rest);
    }
    command.env_clear();
    for entry in hook.env().iter().flatten() {
        if let Some((key, value)) = entry.split_once('=') {
            command.env(key, value);
        }
    }
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .context("starting it")?;
    // A hook that does not read its state still runs.
    let _ = child
        .stdin
        .take()
        .expect("piped")
        .write_all(state.as_bytes());
    let timeout = hook
        .timeout()
        .filter(|&t| t > 0)
        .map_or(DEFAULT_TIMEOUT, |t| Duration::from_secs(t as u64));
    let began = Instant::now();
    loop {
        if let Some(status) = child.try_wait()? {
            if !status.success() {
                bail!("it failed ({status})");
            }
            return Ok(());
        }
        if began.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            bail!("it did not end within {} s", timeout.as_secs());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[cfg(test)]
mod tests {
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
}
