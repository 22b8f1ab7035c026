//! The container's log: its stdout and stderr as JSON lines, one per line
//! of output, each with its stream and the time it arrived (docker's
//! json-file format): `{"time":"…","stream":"stdout","log":"hi\n"}`.

use std::fs::File;
use std::io::{self, Write};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

/// A partial line longer than this is written as it is.
const MAX_LINE: usize = 16 * 1024;

#[derive(Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Line {
    pub time: String,
    pub stream: String,
    pub log: String,
}

/// One stream's writer into the log; writers of one log share the file.
pub struct LogWriter {
    file: Arc<Mutex<File>>,
    stream: &'static str,
    partial: Vec<u8>,
}

impl LogWriter {
    /// Writers for the container's stdout and stderr, appending to `file`.
    pub fn pair(file: File) -> (Self, Self) {
        let file = Arc::new(Mutex::new(file));
        let writer = |stream| LogWriter {
            file: file.clone(),
            stream,
            partial: Vec::new(),
        };
        (writer("stdout"), writer("stderr"))
    }

    fn emit(&mut self, bytes: &[u8]) -> io::Result<()> {
        let line = Line {
            time: super::record::now(),
            stream: self.stream.into(),
            log: String::from_utf8_lossy(bytes).into_owned(),
        };
        let mut json = serde_json::to_vec(&line).map_err(io::Error::other)?;
        json.push(b'\n');
        crate::lock(&self.file).write_all(&json)
    }
}

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.partial.extend_from_slice(buf);
        while let Some(end) = self.partial.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.partial.drain(..=end).collect();
            self.emit(&line)?;
        }
        if self.partial.len() >= MAX_LINE {
            let line = std::mem::take(&mut self.partial);
            self.emit(&line)?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for LogWriter {
    /// The last line, even without its newline.
    fn drop(&mut self) {
        if !self.partial.is_empty() {
            let line = std::mem::take(&mut self.partial);
            let _ = self.emit(&line);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_line_is_a_record_with_its_stream() {
        let path = std::env::temp_dir().join(format!("uvm-log-test-{}", std::process::id()));
        let (mut out, mut err) = LogWriter::pair(File::create(&path).unwrap());
        out.write_all(b"one\ntw").unwrap();
        err.write_all(b"oops\n").unwrap();
        out.write_all(b"o\nlast").unwrap();
        drop((out, err));
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        let lines: Vec<Line> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let got: Vec<(&str, &str)> = lines
            .iter()
            .map(|l| (l.stream.as_str(), l.log.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                ("stdout", "one\n"),
                ("stderr", "oops\n"),
                ("stdout", "two\n"),
                ("stdout", "last")
            ]
        );
        assert!(humantime::parse_rfc3339(&lines[0].time).is_ok());
    }
}
