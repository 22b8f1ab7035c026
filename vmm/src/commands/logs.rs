//! `uvm logs`: the container's output from the VM's log, optionally
//! followed until the VM ends.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Write};
use std::time::Duration;

use anyhow::Context;
use vmm::state::log::Line;
use vmm::state::{Root, StateFiles};

/// How often a followed log is read again.
const FOLLOW_INTERVAL: Duration = Duration::from_millis(50);

#[derive(clap::Args)]
pub struct LogsArgs {
    /// Keep printing what the container writes, until the VM ends.
    #[arg(short = 'f', long)]
    follow: bool,
    /// Begin each line with the time it was written (RFC 3339).
    #[arg(short = 't', long)]
    timestamps: bool,
    #[arg(value_name = "ID|NAME")]
    vm: String,
}

pub fn logs(root: &Root, args: &LogsArgs) -> anyhow::Result<i32> {
    let entry = root.find(&args.vm)?;
    let path = entry.log();
    let file = match File::open(&path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound && !entry.record.detached => {
            anyhow::bail!(
                "utility VM {} runs in the foreground: its output goes to its terminal",
                super::display_name(&entry)
            )
        }
        Err(e) => return Err(e).with_context(|| format!("{}", path.display())),
    };
    let mut reader = BufReader::new(file);
    let mut line = String::new();
    loop {
        // Whatever the VM wrote before it ended is read in this round.
        let ended = !args.follow || entry.ended();
        // A partial line (still being written) waits for its end.
        while reader.read_line(&mut line)? > 0 && line.ends_with('\n') {
            print_line(&line, args.timestamps)?;
            line.clear();
        }
        if ended {
            return Ok(0);
        }
        std::thread::sleep(FOLLOW_INTERVAL);
    }
}

fn print_line(json: &str, timestamps: bool) -> anyhow::Result<()> {
    let line: Line = serde_json::from_str(json).context("a corrupt log line")?;
    let text = match timestamps {
        true => format!("{} {}", line.time, line.log),
        false => line.log,
    };
    match line.stream.as_str() {
        "stderr" => io::stderr().write_all(text.as_bytes())?,
        _ => {
            let mut out = io::stdout().lock();
            out.write_all(text.as_bytes())?;
            out.flush()?;
        }
    }
    Ok(())
}
