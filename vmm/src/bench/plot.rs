//! The distributions as an SVG: one row per series, one dot per VM, a bar
//! at the median; time to agent ready on top, end-to-end below.

use std::path::Path;

use plotters::prelude::*;

use super::launch::Sample;
use super::report::{Results, Stats};

const WIDTH: u32 = 960;
const ROW_HEIGHT: u32 = 40;
const COLORS: [RGBColor; 4] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
];

type Panel = (&'static str, fn(&Sample) -> f64);

const PANELS: [Panel; 2] = [
    ("agent ready, s after spawn", |s| s.ready_ms / 1e3),
    ("end to end (VMM exited), s after spawn", |s| {
        s.total_ms / 1e3
    }),
];

pub fn draw(results: &Results, path: &Path) -> anyhow::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let rows = results.series.len().max(1) as u32;
    let height = 2 * (rows * ROW_HEIGHT + 90);
    let root = SVGBackend::new(path, (WIDTH, height)).into_drawing_area();
    root.fill(&WHITE)?;
    let panels = root.split_evenly((2, 1));
    for (area, (title, value)) in panels.iter().zip(PANELS) {
        panel(area, results, title, value)?;
    }
    root.present()?;
    Ok(())
}

fn panel(
    area: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>,
    results: &Results,
    title: &str,
    value: fn(&Sample) -> f64,
) -> anyhow::Result<()> {
    let all = results.series.iter().flat_map(|s| s.samples().map(value));
    let max = all.fold(0.0_f64, f64::max).max(0.001) * 1.05;
    let rows = results.series.len();
    let names: Vec<String> = results.series.iter().map(|s| s.name.clone()).collect();
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(30)
        .y_label_area_size(180)
        .build_cartesian_2d(0.0..max, -0.5..(rows as f64 - 0.5))?;
    chart
        .configure_mesh()
        .y_labels(rows.max(1))
        .y_label_formatter(&|y| {
            let i = y.round();
            match (i - y).abs() < 0.01 && i >= 0.0 {
                true => names.get(i as usize).cloned().unwrap_or_default(),
                false => String::new(),
            }
        })
        .x_desc("seconds")
        .draw()?;
    for (row, series) in results.series.iter().enumerate() {
        let color = COLORS[row % COLORS.len()];
        let values: Vec<f64> = series.samples().map(value).collect();
        // Spread the dots over the row so that equal times stay visible.
        let dots = values.iter().enumerate().map(|(i, &x)| {
            let y = row as f64 + ((i % 7) as f64 - 3.0) * 0.05;
            Circle::new((x, y), 3, color.mix(0.7).filled())
        });
        chart.draw_series(dots)?;
        if let Some(median) = Stats::of(values).map(|s| s.median) {
            let y = row as f64;
            let bar = [(median, y - 0.35), (median, y + 0.35)];
            chart.draw_series(LineSeries::new(bar, color.stroke_width(3)))?;
        }
    }
    Ok(())
}
