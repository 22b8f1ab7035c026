//! `uvm image …`, `uvm images` and `uvm rmi`: the image store at the
//! command line, and what `uvm run IMAGE` takes from it.

use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;
use uvm_image::registry::Access;
use uvm_image::store::{Progress, Removed};
use uvm_image::{Reference, Store};

#[derive(Subcommand)]
pub enum ImageCommand {
    /// Import an image from an OCI layout directory, an OCI archive or a
    /// docker archive (`docker save`, `podman save`, `skopeo copy`).
    Import {
        /// The directory or archive file.
        source: PathBuf,
        /// The name to give it [default: the name the source gives it].
        #[arg(long, value_name = "REF")]
        name: Option<String>,
    },
    /// List the images in the store.
    Ls,
    /// An image's ID, names and config as JSON.
    Inspect {
        #[arg(value_name = "IMAGE")]
        reference: String,
    },
    /// Remove names (an image goes with its last name; a layer when no
    /// image uses it).
    Rm {
        #[arg(value_name = "IMAGE", required = true)]
        references: Vec<String>,
    },
    /// Remove images without a name and layers no image uses.
    Prune,
}

/// The store at `$UVM_STORE`, /var/lib/uvm (root) or ~/.local/share/uvm.
pub fn store() -> anyhow::Result<Store> {
    let root = Store::default_root()
        .context("no image store: set UVM_STORE (or HOME) to say where it is")?;
    Ok(Store::open(&root)?)
}

pub fn run(command: ImageCommand) -> anyhow::Result<i32> {
    let store = store()?;
    match command {
        ImageCommand::Import { source, name } => import(&store, &source, name.as_deref()),
        ImageCommand::Ls => list(&store),
        ImageCommand::Inspect { reference } => inspect(&store, &reference),
        ImageCommand::Rm { references } => remove(&store, &references),
        ImageCommand::Prune => {
            report(&store.prune()?);
            Ok(0)
        }
    }
}

fn import(store: &Store, source: &std::path::Path, name: Option<&str>) -> anyhow::Result<i32> {
    let (id, name) = store.import(source, name, &mut show_progress)?;
    match name {
        Some(name) => println!("{name} {id}"),
        None => println!("{id}"),
    }
    Ok(0)
}

/// `uvm pull`: a progress bar per layer downloading, then the import's lines.
pub fn pull(reference: &str, access: &Access) -> anyhow::Result<i32> {
    let store = store()?;
    let reference = Reference::parse(reference)?;
    let bars = indicatif::MultiProgress::new();
    let mut downloading: Vec<Option<indicatif::ProgressBar>> = Vec::new();
    let style = indicatif::ProgressStyle::with_template(
        "layer {prefix}: {bar:30} {bytes}/{total_bytes} {bytes_per_sec}",
    )
    .expect("a valid template");
    let id = store.pull(&reference, access, &mut |progress| match progress {
        Progress::Downloading {
            index,
            of,
            done,
            total,
        } => {
            downloading.resize(downloading.len().max(index + 1), None);
            let bar = downloading[index].get_or_insert_with(|| {
                let bar = bars.add(indicatif::ProgressBar::new(total));
                bar.set_style(style.clone());
                bar.set_prefix(format!("{}/{of}", index + 1));
                bar
            });
            bar.set_position(done);
            if done == total {
                bar.finish();
            }
        }
        other => show_progress(other),
    })?;
    println!("{reference} {id}");
    Ok(0)
}

/// One line per layer on stderr, as it is done.
pub fn show_progress(progress: Progress) {
    match progress {
        Progress::Downloading { .. } => {}
        Progress::Reused { index, of, diff_id } => {
            eprintln!(
                "layer {}/{of} {}: already stored",
                index + 1,
                diff_id.short()
            );
        }
        Progress::Converted {
            index,
            of,
            diff_id,
            bytes,
            seconds,
        } => {
            let mib = bytes as f64 / f64::from(1 << 20);
            eprintln!(
                "layer {}/{of} {}: converted {mib:.1} MiB in {seconds:.2} s ({:.0} MiB/s)",
                index + 1,
                diff_id.short(),
                mib / seconds.max(1e-6)
            );
        }
    }
}

fn list(store: &Store) -> anyhow::Result<i32> {
    println!(
        "{:<50} {:<12} {:>6} {:>10}  CREATED",
        "NAME", "IMAGE ID", "LAYERS", "SIZE"
    );
    for image in store.list()? {
        let size = format!("{:.1} MiB", image.size as f64 / f64::from(1 << 20));
        let created = image.created.as_deref().unwrap_or("-");
        let names = if image.names.is_empty() {
            vec!["<none>".to_string()]
        } else {
            image.names
        };
        for name in names {
            println!(
                "{name:<50} {:<12} {:>6} {size:>10}  {created}",
                image.id.short(),
                image.layers
            );
        }
    }
    Ok(0)
}

fn inspect(store: &Store, reference: &str) -> anyhow::Result<i32> {
    let (id, names, config) = store.inspect(reference)?;
    let json = serde_json::json!({ "id": id.to_string(), "names": names, "config": config });
    println!("{}", serde_json::to_string_pretty(&json)?);
    Ok(0)
}

fn remove(store: &Store, references: &[String]) -> anyhow::Result<i32> {
    let mut code = 0;
    for reference in references {
        match store.remove(reference) {
            Ok(removed) => report(&removed),
            Err(e) => {
                eprintln!("uvm: error: {e}");
                code = 1;
            }
        }
    }
    Ok(code)
}

fn report(removed: &Removed) {
    for name in &removed.names {
        println!("Untagged: {name}");
    }
    for id in &removed.images {
        println!("Deleted: {id}");
    }
    for layer in &removed.layers {
        println!("Deleted layer: {layer}");
    }
}
