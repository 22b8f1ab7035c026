//! Errors and warnings, on stderr and in the `--log` file: a JSON object
//! per line with `--log-format json`, the way runc writes them and podman
//! and containerd read them.

use std::io::Write;
use std::path::{Path, PathBuf};

pub struct Log {
    file: Option<PathBuf>,
    json: bool,
}

impl Log {
    pub fn new(file: Option<&Path>, json: bool) -> Self {
        Self {
            file: file.map(Path::to_owned),
            json,
        }
    }

    /// An error: on stderr and in the log.
    pub fn error(&self, e: &anyhow::Error) {
        let message = vmm::describe(e);
        eprintln!("uvm-oci: error: {message}");
        self.append("error", &message);
    }

    /// A warning: in the log if there is one, else on stderr (during
    /// `create`, the container's stderr).
    pub fn warn(&self, message: &str) {
        match self.file {
            Some(_) => self.append("warning", message),
            None => eprintln!("uvm-oci: warning: {message}"),
        }
    }

    fn append(&self, level: &str, message: &str) {
        let Some(path) = &self.file else {
            return;
        };
        let line = line(level, message, self.json);
        let written = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .and_then(|mut file| file.write_all(line.as_bytes()));
        if let Err(e) = written {
            eprintln!("uvm-oci: log {}: {e}", path.display());
        }
    }
}

fn line(level: &str, message: &str, json: bool) -> String {
    let time = humantime::format_rfc3339_nanos(std::time::SystemTime::now());
    match json {
        true => {
            let object =
                serde_json::json!({ "level": level, "msg": message, "time": time.to_string() });
            format!("{object}\n")
        }
        false => format!("time=\"{time}\" level={level} msg={message:?}\n"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_json_line_is_one_object_with_level_msg_and_time() {
        let json = line("error", "container \"x\" does not exist", true);
        assert!(json.ends_with('\n') && json.matches('\n').count() == 1);
        let object: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(object["level"], "error");
        assert_eq!(object["msg"], "container \"x\" does not exist");
        assert!(object["time"].as_str().unwrap().starts_with("20"));
        assert!(line("warning", "m", false).contains("level=warning msg=\"m\""));
    }
}
