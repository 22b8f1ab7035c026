//! A VM's record (`state.json`): what it runs, when, and how it ended. Its
//! JSON is what `uvm inspect` prints (README.md documents it).

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

/// What the VM was started with.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Config {
    pub command: Vec<String>,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub cpus: u8,
    pub memory_mib: u64,
    pub layers: Vec<PathBuf>,
    pub scratch: Option<PathBuf>,
    /// uvm created the scratch image for this VM (`rm` removes it).
    pub scratch_created: bool,
    pub tty: bool,
}

/// The VMM's own view of its VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Booting: the container process has not started yet.
    Created,
    Running,
    Exited,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub id: String,
    pub name: Option<String>,
    pub phase: Phase,
    /// The VMM process (uvm) that owns the VM.
    pub pid: u32,
    /// RFC 3339, UTC.
    pub created: String,
    pub started: Option<String>,
    pub ended: Option<String>,
    /// The container's exit status as uvm reports it (a shell's: 128 + a
    /// signal), once it ended.
    pub exit_code: Option<i32>,
    /// Why the VM ended without the container's own status, if it did.
    pub error: Option<String>,
    /// Started with `run -d`: its output is in the log.
    pub detached: bool,
    pub config: Config,
}

/// A VM's status, as `ps` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Status {
    Created,
    Running,
    Exited(i32),
    /// Its VMM process ended without recording how the VM did.
    Dead,
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Status::Created => f.write_str("created"),
            Status::Running => f.write_str("running"),
            Status::Exited(code) => write!(f, "exited ({code})"),
            Status::Dead => f.write_str("dead"),
        }
    }
}

impl Status {
    /// The one-word form (`ps --format json`).
    pub fn word(&self) -> &'static str {
        match self {
            Status::Created => "created",
            Status::Running => "running",
            Status::Exited(_) => "exited",
            Status::Dead => "dead",
        }
    }
}

impl Record {
    pub fn new(id: String, name: Option<String>, config: Config, detached: bool) -> Self {
        Self {
            id,
            name,
            phase: Phase::Created,
            pid: std::process::id(),
            created: now(),
            started: None,
            ended: None,
            exit_code: None,
            error: None,
            detached,
            config,
        }
    }

    /// Its status, given whether its VMM process is alive.
    pub fn status(&self, alive: bool) -> Status {
        match (self.phase, alive) {
            (Phase::Exited, _) => Status::Exited(self.exit_code.unwrap_or(-1)),
            (_, false) => Status::Dead,
            (Phase::Created, true) => Status::Created,
            (Phase::Running, true) => Status::Running,
        }
    }

    pub fn set_running(&mut self) {
        self.phase = Phase::Running;
        self.started = Some(now());
    }

    /// The VM ended: with the container's status, or an error.
    pub fn set_exited(&mut self, code: i32, error: Option<String>) {
        self.phase = Phase::Exited;
        self.ended = Some(now());
        self.exit_code = Some(code);
        self.error = error;
    }

    /// How long the VM has run (until it ended, if it did).
    pub fn uptime(&self) -> Option<Duration> {
        let started = parse(self.started.as_deref()?)?;
        let until = match &self.ended {
            Some(ended) => parse(ended)?,
            None => SystemTime::now(),
        };
        until.duration_since(started).ok()
    }

    pub fn created_at(&self) -> Option<SystemTime> {
        parse(&self.created)
    }

    pub fn created_scratch(&self) -> Option<&Path> {
        self.config
            .scratch
            .as_deref()
            .filter(|_| self.config.scratch_created)
    }
}

pub fn now() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

fn parse(time: &str) -> Option<SystemTime> {
    humantime::parse_rfc3339(time).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_that_says_running_without_its_vmm_is_dead() {
        let mut record = Record::new("ab".into(), None, Config::default(), true);
        assert_eq!(record.status(true), Status::Created);
        assert_eq!(record.status(false), Status::Dead);
        record.set_running();
        assert_eq!(record.status(true), Status::Running);
        assert_eq!(record.status(false), Status::Dead);
        assert!(record.uptime().is_some());
        record.set_exited(3, None);
        assert_eq!(record.status(false), Status::Exited(3));
        assert_eq!(Status::Exited(3).to_string(), "exited (3)");
    }
}
