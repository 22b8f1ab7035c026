//! `uvm template ls | rm | prune`, and the templates `uvm run` uses.

use anyhow::Context;
use clap::Subcommand;
use vmm::template::{self, Templates};

#[derive(Subcommand)]
pub enum TemplateCommand {
    /// List the templates: key, age, disk space, what they were taken from.
    Ls,
    /// Remove templates by key (or the start of one).
    Rm {
        #[arg(value_name = "KEY", required = true)]
        keys: Vec<String>,
    },
    /// Remove the templates whose kernel, initrd or layers changed or went.
    Prune,
}

/// The templates in the image store (`$UVM_STORE`, /var/lib/uvm as root,
/// ~/.local/share/uvm), if there is one.
pub fn templates() -> Option<Templates> {
    uvm_image::Store::default_root().map(|root| Templates::in_store(&root))
}

pub fn run(command: TemplateCommand) -> anyhow::Result<i32> {
    let templates =
        templates().context("no store for templates: set UVM_STORE (or HOME) to say where")?;
    match command {
        TemplateCommand::Ls => list(&templates),
        TemplateCommand::Rm { keys } => {
            for key in keys {
                println!("{}", templates.remove(&key)?);
            }
            Ok(0)
        }
        TemplateCommand::Prune => {
            for key in templates.prune()? {
                println!("{key}");
            }
            Ok(0)
        }
    }
}

fn list(templates: &Templates) -> anyhow::Result<i32> {
    println!(
        "{:<12}  {:<10}  {:>9}  {:>7}  INPUTS",
        "KEY", "CREATED", "DISK", "SAVE"
    );
    for t in templates.list()? {
        let (created, save, files) = match &t.inputs {
            Some(inputs) => (
                age(inputs.created),
                format!("{:.0} ms", inputs.save_ms),
                inputs
                    .files
                    .iter()
                    .map(|(path, _)| path.display().to_string())
                    .collect::<Vec<_>>()
                    .join(" "),
            ),
            None => ("?".into(), "?".into(), "(unreadable)".into()),
        };
        println!(
            "{:<12}  {:<10}  {:>6} MiB  {:>7}  {files}",
            template::short(&t.key),
            created,
            t.disk_bytes >> 20,
            save
        );
    }
    Ok(0)
}

fn age(when: std::time::SystemTime) -> String {
    let secs = when.elapsed().map_or(0, |d| d.as_secs());
    match secs {
        0..60 => format!("{secs} s ago"),
        60..3600 => format!("{} min ago", secs / 60),
        3600..86400 => format!("{} h ago", secs / 3600),
        _ => format!("{} d ago", secs / 86400),
    }
}
