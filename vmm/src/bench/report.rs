//! Benchmark results: stored as JSON (every run and the summary), shown as
//! a table, and compared with a baseline.

use std::collections::BTreeMap;
use std::fmt::{self, Write as _};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

use super::launch::{Batch, Sample, Vmm};

#[derive(Debug, Serialize, Deserialize)]
pub struct Results {
    pub command: Vec<String>,
    pub runs: u32,
    pub warmup: u32,
    pub parallel: u32,
    pub host: String,
    pub memory_mib: u64,
    pub layers: usize,
    pub series: Vec<Series>,
}

/// One VMM booting one kernel, `runs` times.
#[derive(Debug, Serialize, Deserialize)]
pub struct Series {
    pub name: String,
    pub vmm: Vmm,
    pub kernel: PathBuf,
    pub batches: Vec<Batch>,
    /// Written for readers of the JSON; recomputed from the runs on load.
    #[serde(default, skip_deserializing)]
    pub summary: BTreeMap<&'static str, Stats>,
}

/// A phase's distribution over the runs.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub(super) struct Stats {
    pub min: f64,
    pub median: f64,
    pub p90: f64,
    pub max: f64,
}

impl Stats {
    pub(super) fn of(mut values: Vec<f64>) -> Option<Self> {
        values.sort_by(f64::total_cmp);
        let at = |q: f64| values[((q * values.len() as f64).ceil() as usize).max(1) - 1];
        let (&min, &max) = (values.first()?, values.last()?);
        let median = match values.len() % 2 {
            1 => values[values.len() / 2],
            _ => (values[values.len() / 2 - 1] + values[values.len() / 2]) / 2.0,
        };
        Some(Self {
            min,
            median,
            p90: at(0.9),
            max,
        })
    }
}

type PerVm = fn(&Sample) -> Option<f64>;
type PerBatch = fn(&Batch) -> f64;

/// Each VM's phases: from spawn to the first guest instruction, to the
/// agent's start, to the process's start and end, to the VMM's exit.
const PHASES: [(&str, PerVm); 9] = [
    ("vmm_setup_ms", |s| s.vmm_setup_ms),
    ("kernel_ms", |s| {
        s.vmm_setup_ms.map(|setup| s.ready_ms - setup)
    }),
    ("agent_ms", |s| Some(s.process_started_ms - s.ready_ms)),
    ("process_ms", |s| {
        Some(s.process_exited_ms - s.process_started_ms)
    }),
    ("teardown_ms", |s| Some(s.total_ms - s.process_exited_ms)),
    ("ready_ms", |s| Some(s.ready_ms)),
    ("total_ms", |s| Some(s.total_ms)),
    ("vmm_rss_kib", |s| s.vmm_rss_kib.map(|kib| kib as f64)),
    ("vmm_cpu_ms", |s| Some(s.vmm_cpu_ms)),
];

/// Each batch's: all its VMs ready, and the host memory they took.
const BATCH_PHASES: [(&str, PerBatch); 2] = [
    ("all_ready_ms", |b| b.all_ready_ms),
    ("host_memory_kib", |b| b.host_memory_kib as f64),
];

const TOTAL: &str = "total_ms";

impl Series {
    pub fn new(vmm: Vmm, kernel: &Path) -> Self {
        Self {
            name: String::new(),
            vmm,
            kernel: kernel.to_path_buf(),
            batches: Vec::new(),
            summary: BTreeMap::new(),
        }
    }

    pub fn samples(&self) -> impl Iterator<Item = &Sample> {
        self.batches.iter().flat_map(|b| &b.samples)
    }

    fn summarize(&self) -> BTreeMap<&'static str, Stats> {
        let per_vm = PHASES.iter().filter_map(|&(name, phase)| {
            let values: Vec<f64> = self.samples().filter_map(phase).collect();
            Some((name, Stats::of(values)?))
        });
        let per_batch = BATCH_PHASES.iter().filter_map(|&(name, phase)| {
            Some((name, Stats::of(self.batches.iter().map(phase).collect())?))
        });
        per_vm.chain(per_batch).collect()
    }
}

impl Results {
    /// Names the series `VMM KERNEL`, by the kernel's file name unless two
    /// kernels share it.
    pub fn labelled(mut series: Vec<Series>) -> Vec<Series> {
        let file_name = |s: &Series| s.kernel.file_name().map(|n| n.to_os_string());
        let kernels: std::collections::BTreeSet<&PathBuf> =
            series.iter().map(|s| &s.kernel).collect();
        let names: std::collections::BTreeSet<_> = series.iter().map(file_name).collect();
        let short = names.len() == kernels.len();
        for s in &mut series {
            let kernel = match (short, file_name(s)) {
                (true, Some(name)) => name.to_string_lossy().into_owned(),
                _ => s.kernel.display().to_string(),
            };
            s.name = format!("{} {kernel}", s.vmm);
        }
        series
    }

    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("bench results {}", path.display()))?;
        let mut results: Self = serde_json::from_str(&text)
            .with_context(|| format!("bench results {}: not uvm bench JSON", path.display()))?;
        for s in &mut results.series {
            s.summary = s.summarize();
        }
        Ok(results)
    }

    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        let mut copy = serde_json::to_value(self)?;
        for (i, s) in self.series.iter().enumerate() {
            copy["series"][i]["summary"] = serde_json::to_value(s.summarize())?;
        }
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let text = serde_json::to_string_pretty(&copy)?;
        std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))
    }

    /// min / median / p90 / max of every phase per series, and the ratio of
    /// uvm's median to QEMU's for each kernel that both booted.
    pub fn table(&self) -> String {
        let summaries: Vec<_> = self.series.iter().map(Series::summarize).collect();
        let pairs = self.pairs();
        let mut out = self.title();
        let _ = write!(out, "{:16}", "");
        for s in &self.series {
            let _ = write!(out, " | {:^35}", s.name);
        }
        for &(uvm, _) in &pairs {
            let _ = write!(out, " | {}", ratio_title(&self.series[uvm]));
        }
        let _ = write!(out, "\n{:16}", "");
        for _ in &self.series {
            let _ = write!(
                out,
                " | {:>8} {:>8} {:>8} {:>8}",
                "min", "median", "p90", "max"
            );
        }
        out.push('\n');
        let phases = PHASES
            .iter()
            .map(|p| p.0)
            .chain(BATCH_PHASES.iter().map(|p| p.0));
        for phase in phases {
            let _ = write!(out, "{phase:16}");
            for summary in &summaries {
                match summary.get(phase) {
                    Some(s) => {
                        let _ = write!(
                            out,
                            " | {:>8.1} {:>8.1} {:>8.1} {:>8.1}",
                            s.min, s.median, s.p90, s.max
                        );
                    }
                    None => {
                        let _ = write!(out, " | {:>8} {:>8} {:>8} {:>8}", "-", "-", "-", "-");
                    }
                }
            }
            for &(uvm, qemu) in &pairs {
                let ratio = summaries[uvm].get(phase).zip(summaries[qemu].get(phase));
                let width = ratio_title(&self.series[uvm]).len();
                match ratio {
                    Some((u, q)) if q.median > 0.0 => {
                        let _ = write!(out, " | {:>width$.2}", u.median / q.median);
                    }
                    _ => {
                        let _ = write!(out, " | {:>width$}", "-");
                    }
                }
            }
            out.push('\n');
        }
        out
    }

    fn title(&self) -> String {
        let at_once = match self.parallel {
            1 => "one VM at a time".to_string(),
            p => format!("{p} VMs at once"),
        };
        format!(
            "uvm bench: `{}`, {} runs after {} warm-up, {at_once}, {} MiB, {} layer(s), {} host; \
             times in ms from each VMM's spawn\n",
            self.command.join(" "),
            self.runs,
            self.warmup,
            self.memory_mib,
            self.layers,
            self.host
        )
    }

    /// (uvm, qemu) series indices per kernel booted by both (uvm cold and
    /// from its template).
    fn pairs(&self) -> Vec<(usize, usize)> {
        let find = |vmm: Vmm, kernel: &Path| {
            self.series
                .iter()
                .position(|s| s.vmm == vmm && s.kernel == kernel)
        };
        let uvm = self
            .series
            .iter()
            .enumerate()
            .filter(|(_, s)| s.vmm != Vmm::Qemu);
        uvm.filter_map(|(i, s)| Some((i, find(Vmm::Qemu, &s.kernel)?)))
            .collect()
    }

    /// Each series' median total against the same series in `baseline`.
    pub fn compare(&self, baseline: &Results, max_regression: f64) -> anyhow::Result<Verdict> {
        let setup = |r: &Results| {
            (
                r.command.clone(),
                r.parallel,
                r.memory_mib,
                r.layers,
                r.host.clone(),
            )
        };
        if setup(self) != setup(baseline) {
            bail!(
                "the baseline measured something else: command, VMs at once, MiB, layers, host {:?} here, {:?} there",
                setup(self),
                setup(baseline)
            );
        }
        let mut changes = Vec::new();
        for s in &self.series {
            let Some(old) = baseline.series.iter().find(|b| b.name == s.name) else {
                let names: Vec<&str> = baseline.series.iter().map(|b| b.name.as_str()).collect();
                bail!(
                    "the baseline has no series `{}` (it has: {})",
                    s.name,
                    names.join(", ")
                );
            };
            let median = |s: &Series| s.summarize().get(TOTAL).map(|t| t.median);
            let (Some(now), Some(then)) = (median(s), median(old)) else {
                bail!("series `{}` has no runs to compare", s.name);
            };
            changes.push(Change {
                series: s.name.clone(),
                now,
                then,
            });
        }
        Ok(Verdict {
            changes,
            max_regression,
        })
    }
}

fn ratio_title(uvm: &Series) -> String {
    let (vmm, kernel) = uvm.name.split_once(' ').unwrap_or(("uvm", &uvm.name));
    format!("{vmm}/qemu {kernel}")
}

struct Change {
    series: String,
    now: f64,
    then: f64,
}

impl Change {
    fn worse_by(&self) -> f64 {
        self.now / self.then - 1.0
    }
}

/// The baseline comparison: pass or fail, and by how much.
pub struct Verdict {
    changes: Vec<Change>,
    max_regression: f64,
}

impl Verdict {
    pub fn regressed(&self) -> bool {
        self.changes
            .iter()
            .any(|c| c.worse_by() > self.max_regression)
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, c) in self.changes.iter().enumerate() {
            let verdict = match c.worse_by() > self.max_regression {
                true => "REGRESSION",
                false => "ok",
            };
            if i > 0 {
                writeln!(f)?;
            }
            write!(
                f,
                "baseline: {} median total {:.1} ms vs {:.1} ms: {:+.1}% (limit +{:.1}%) {verdict}",
                c.series,
                c.now,
                c.then,
                c.worse_by() * 100.0,
                self.max_regression * 100.0
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(total: f64) -> Sample {
        Sample {
            vmm_setup_ms: Some(10.0),
            ready_ms: 100.0,
            process_started_ms: 150.0,
            process_exited_ms: 180.0,
            total_ms: total,
            vmm_rss_kib: Some(3000),
            vmm_cpu_ms: 50.0,
        }
    }

    fn results(totals: &[f64]) -> Results {
        let mut series = Series::new(Vmm::Uvm, Path::new("/k/vmlinux"));
        series.batches = totals
            .iter()
            .map(|&t| Batch {
                samples: vec![sample(t)],
                all_ready_ms: 100.0,
                host_memory_kib: 20_000,
            })
            .collect();
        Results {
            command: vec!["/bin/true".into()],
            runs: totals.len() as u32,
            warmup: 0,
            parallel: 1,
            host: "pvm".into(),
            memory_mib: 128,
            layers: 1,
            series: Results::labelled(vec![series]),
        }
    }

    #[test]
    fn stats_use_nearest_rank() {
        let s = Stats::of((1..=10).map(f64::from).collect()).unwrap();
        assert_eq!((s.min, s.median, s.p90, s.max), (1.0, 5.5, 9.0, 10.0));
        assert_eq!(Stats::of(vec![7.0]).unwrap().p90, 7.0);
        assert_eq!(Stats::of(vec![]), None);
    }

    #[test]
    fn phases_split_the_total() {
        let r = results(&[200.0, 220.0, 210.0]);
        let summary = r.series[0].summarize();
        assert_eq!(summary["kernel_ms"].median, 90.0);
        assert_eq!(summary["agent_ms"].median, 50.0);
        assert_eq!(summary["teardown_ms"].median, 30.0);
        assert_eq!(summary["total_ms"].median, 210.0);
        let table = r.table();
        assert!(
            table.contains("uvm vmlinux") && table.contains("total_ms"),
            "{table}"
        );
    }

    #[test]
    fn the_gate_fails_only_past_the_limit() {
        let now = results(&[200.0, 210.0, 220.0]);
        let same = now.compare(&results(&[200.0, 210.0, 220.0]), 0.1).unwrap();
        assert!(!same.regressed(), "{same}");
        let faster_then = now.compare(&results(&[100.0, 105.0, 110.0]), 0.1).unwrap();
        assert!(faster_then.regressed());
        assert!(faster_then.to_string().contains("+100.0%"), "{faster_then}");
        let mut other = results(&[1.0]);
        other.series[0].name = "qemu vmlinux".into();
        assert!(now.compare(&other, 0.1).is_err());
        let mut parallel = results(&[200.0, 210.0, 220.0]);
        parallel.parallel = 4;
        let Err(err) = now.compare(&parallel, 0.1) else {
            panic!("a baseline of 4 VMs at once compared with 1");
        };
        assert!(err.to_string().contains("something else"), "{err}");
    }

    #[test]
    fn json_round_trips_with_a_summary() {
        let r = results(&[200.0, 220.0]);
        let path = std::env::temp_dir().join(format!("uvm-bench-{}.json", std::process::id()));
        r.save(&path).unwrap();
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(json["series"][0]["summary"]["total_ms"]["median"], 210.0);
        let back = Results::load(&path).unwrap();
        assert_eq!(back.series[0].samples().count(), 2);
        std::fs::write(&path, "{}").unwrap();
        assert!(Results::load(&path).is_err());
        std::fs::remove_file(path).unwrap();
    }
}
