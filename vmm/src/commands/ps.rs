//! `uvm ps` and `uvm inspect`: what the state directories say, with each
//! VM's VMM process checked for life.

use std::time::{Duration, SystemTime};

use serde_json::{json, Value};
use vmm::state::{Entry, Root, Status};

use super::lifecycle::VmsArgs;

#[derive(clap::Args)]
pub struct PsArgs {
    /// Ended and dead VMs too.
    #[arg(short = 'a', long)]
    all: bool,
    /// `table` or `json` (an array of the objects README.md describes).
    #[arg(long, default_value = "table", value_parser = ["table", "json"])]
    format: String,
}

pub fn ps(root: &Root, args: &PsArgs) -> anyhow::Result<i32> {
    let entries: Vec<Entry> = root
        .list()?
        .into_iter()
        .filter(|e| args.all || matches!(e.status(), Status::Running | Status::Created))
        .collect();
    if args.format == "json" {
        let list: Vec<Value> = entries.iter().map(summary).collect();
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(0);
    }
    let rows: Vec<[String; 10]> = entries.iter().map(row).collect();
    let header = [
        "ID", "NAME", "COMMAND", "STATUS", "CREATED", "UPTIME", "CPUS", "MEMORY", "LAYERS", "PID",
    ]
    .map(String::from);
    print_table(std::iter::once(header).chain(rows));
    Ok(0)
}

pub fn inspect(root: &Root, args: &VmsArgs) -> anyhow::Result<i32> {
    let mut list = Vec::new();
    for key in &args.vms {
        let entry = root.find(key)?;
        let mut value = serde_json::to_value(&entry.record)?;
        let status = entry.status();
        if status == Status::Dead {
            let why = format!(
                "its VMM process ({}) ended without recording how the VM did (killed, or the host went down)",
                entry.record.pid
            );
            value["error"] = json!(why);
        }
        value["status"] = json!(status.word());
        value["state_dir"] = json!(entry.dir);
        list.push(value);
    }
    println!("{}", serde_json::to_string_pretty(&list)?);
    Ok(0)
}

/// One VM for `ps --format json`.
fn summary(entry: &Entry) -> Value {
    let record = &entry.record;
    let status = entry.status();
    json!({
        "id": record.id,
        "name": record.name,
        "command": record.config.command,
        "status": status.word(),
        "exit_code": match status { Status::Exited(code) => Some(code), _ => None },
        "created": record.created,
        "started": record.started,
        "uptime_secs": uptime(entry).map(|d| d.as_secs()),
        "cpus": record.config.cpus,
        "memory_mib": record.config.memory_mib,
        "layers": record.config.layers,
        "pid": record.pid,
    })
}

fn row(entry: &Entry) -> [String; 10] {
    let record = &entry.record;
    let ago = record
        .created_at()
        .and_then(|at| SystemTime::now().duration_since(at).ok())
        .map_or("?".into(), |d| format!("{} ago", human(d)));
    [
        entry.short_id().to_string(),
        record.name.clone().unwrap_or_default(),
        shorten(&record.config.command.join(" "), 30),
        entry.status().to_string(),
        ago,
        uptime(entry).map_or("-".into(), human),
        record.config.cpus.to_string(),
        format!("{}M", record.config.memory_mib),
        record.config.layers.len().to_string(),
        record.pid.to_string(),
    ]
}

/// How long it has run; a dead VM's uptime is unknown.
fn uptime(entry: &Entry) -> Option<Duration> {
    match entry.status() {
        Status::Dead => None,
        _ => entry.record.uptime(),
    }
}

fn human(d: Duration) -> String {
    match d.as_secs() {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m", s / 60),
        s if s < 86400 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86400),
    }
}

fn shorten(text: &str, max: usize) -> String {
    match text.chars().count() > max {
        true => format!("{}…", text.chars().take(max - 1).collect::<String>()),
        false => text.to_string(),
    }
}

fn print_table(rows: impl Iterator<Item = [String; 10]>) {
    let rows: Vec<[String; 10]> = rows.collect();
    let mut widths = [0usize; 10];
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    for row in &rows {
        let cells: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        println!("{}", cells.join("  ").trim_end());
    }
}
