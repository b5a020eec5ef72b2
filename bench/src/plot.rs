//! The report's PNGs (plotters, bitmap backend; text drawn with ab_glyph from
//! the DejaVu Sans that the `dejavu` crate embeds, so no system fonts or
//! fontconfig are needed).

use std::path::Path;
use std::sync::Once;

use anyhow::{anyhow, Result};
use plotters::prelude::*;
use serde_json::Value;

const W: u32 = 1000;
const H: u32 = 600;
const MC: RGBColor = RGBColor(0xd6, 0x27, 0x28);
const BRIDGE: RGBColor = RGBColor(0x2c, 0xa0, 0x2c);
const RAW: RGBColor = RGBColor(0x1f, 0x77, 0xb4);
/// By server (`Target::index`): marketcast, the Node bridge, the raw baseline.
const PALETTE: [RGBColor; 3] = [MC, BRIDGE, RAW];

fn color(i: usize) -> RGBColor {
    PALETTE[i % PALETTE.len()]
}

fn fonts() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if plotters::style::register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular())
            .is_err()
        {
            eprintln!("marketcast-bench: the embedded font did not load; plots have no text");
        }
    });
}

fn err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("plotting: {e:?}")
}

/// One line of a percentile plot: its name, its colour index ([`PALETTE`]),
/// (quantile, ms) points.
pub type Curve<'a> = (&'a str, usize, &'a [(f64, f64)]);

/// A latency percentile plot: x = percentile on a "nines" axis
/// (-log10(1 - q)), y = latency on a log axis, one line per series (name,
/// colour index, curve).
pub fn percentiles(path: &Path, title: &str, series: &[Curve<'_>]) -> Result<()> {
    fonts();
    let pts: Vec<(f64, f64)> = series
        .iter()
        .flat_map(|(_, _, c)| c.iter().copied())
        .filter(|(_, v)| v.is_finite() && *v > 0.0)
        .collect();
    if pts.is_empty() {
        return Err(anyhow!("no latency samples to plot"));
    }
    let lo = pts.iter().map(|p| p.1).fold(f64::INFINITY, f64::min);
    let hi = pts.iter().map(|p| p.1).fold(0.0, f64::max);
    let (ylo, yhi) = (
        10f64.powf((lo.log10()).floor()),
        10f64.powf((hi.log10()).ceil()),
    );
    let root = BitMapBackend::new(path, (W, H)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 24))
        .margin(20)
        .margin_right(60)
        .x_label_area_size(50)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..5f64, (ylo..yhi).log_scale())
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_labels(6)
        .x_label_formatter(&|x| {
            let q = 100.0 * (1.0 - 10f64.powf(-x));
            match x.round() as i32 {
                0 => "0 %".into(),
                1 => "90 %".into(),
                2 => "99 %".into(),
                3 => "99.9 %".into(),
                4 => "99.99 %".into(),
                5 => "99.999 %".into(),
                _ => format!("{q:.3} %"),
            }
        })
        .y_label_formatter(&|y| {
            if *y >= 1.0 {
                format!("{y:.0}")
            } else {
                format!("{y}")
            }
        })
        .x_desc("percentile of delivered frames")
        .y_desc("commit-to-client latency (ms)")
        .label_style(("sans-serif", 16))
        .axis_desc_style(("sans-serif", 18))
        .draw()
        .map_err(err)?;
    for &(name, ci, curve) in series {
        let color = color(ci);
        let data: Vec<(f64, f64)> = curve
            .iter()
            .filter(|(q, v)| *q < 1.0 && v.is_finite() && *v > 0.0)
            .map(|(q, v)| (-(1.0 - q).log10(), *v))
            .collect();
        chart
            .draw_series(LineSeries::new(data, color.stroke_width(3)))
            .map_err(err)?
            .label(name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 24, y)], color.stroke_width(3))
            });
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .label_font(("sans-serif", 18))
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()
        .map_err(err)?;
    root.present().map_err(err)?;
    Ok(())
}

/// S2's ramp: delivered frames/s (top) and p99 (bottom, log axis) per offered
/// trade rate, for each target's median run (name, colour index, steps);
/// failing steps drawn hollow, lines through the steps in rate order (the
/// fine ladder goes back below a failing coarse step).
pub fn ramp(
    path: &Path,
    title: &str,
    bound_ms: f64,
    series: &[(&str, usize, &[Value])],
) -> Result<()> {
    fonts();
    let step = |s: &Value| {
        (
            s["rate"].as_f64().unwrap_or(f64::NAN),
            s["frames_per_s"].as_f64().unwrap_or(f64::NAN),
            // Null = infinite (frames not delivered): drawn at the top.
            s["p99_ms"].as_f64().unwrap_or(f64::INFINITY),
            s["pass"].as_bool().unwrap_or(false),
        )
    };
    let all: Vec<_> = series
        .iter()
        .flat_map(|(_, _, v)| v.iter().map(step))
        .collect();
    if all.is_empty() {
        return Err(anyhow!("no ramp steps to plot"));
    }
    let xmax = all.iter().map(|s| s.0).fold(0.0, f64::max) * 1.1;
    let fmax = all.iter().map(|s| s.1).fold(0.0, f64::max).max(1.0) * 1.15;
    let pmax = all
        .iter()
        .map(|s| s.2)
        .filter(|v| v.is_finite())
        .fold(bound_ms, f64::max)
        * 2.0;
    let pmin = all
        .iter()
        .map(|s| s.2)
        .filter(|v| v.is_finite() && *v > 0.0)
        .fold(pmax, f64::min)
        / 2.0;
    let root = BitMapBackend::new(path, (W, H + 200)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let root = root.titled(title, ("sans-serif", 24)).map_err(err)?;
    let (top, bottom) = root.split_vertically((H + 200) / 2 - 10);

    let mut c1 = ChartBuilder::on(&top)
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(90)
        .build_cartesian_2d(0f64..xmax, 0f64..fmax)
        .map_err(err)?;
    c1.configure_mesh()
        .x_label_formatter(&|x| format!("{x:.0}"))
        .x_desc("offered trades/s (one market)")
        .y_desc("delivered frames/s")
        .y_label_formatter(&|y| format!("{:.0}k", y / 1000.0))
        .label_style(("sans-serif", 15))
        .axis_desc_style(("sans-serif", 17))
        .draw()
        .map_err(err)?;
    let mut c2 = ChartBuilder::on(&bottom)
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(90)
        .build_cartesian_2d(0f64..xmax, (pmin..pmax).log_scale())
        .map_err(err)?;
    c2.configure_mesh()
        .x_label_formatter(&|x| format!("{x:.0}"))
        .x_desc("offered trades/s (one market)")
        .y_desc("p99 latency (ms)")
        .y_label_formatter(&|y| format!("{y:.0}"))
        .label_style(("sans-serif", 15))
        .axis_desc_style(("sans-serif", 17))
        .draw()
        .map_err(err)?;
    c2.draw_series(LineSeries::new(
        vec![(0.0, bound_ms), (xmax, bound_ms)],
        BLACK.mix(0.6).stroke_width(2),
    ))
    .map_err(err)?
    .label(format!("bound {bound_ms:.0} ms"))
    .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], BLACK.mix(0.6).stroke_width(2)));
    for &(name, ci, steps) in series {
        let color = color(ci);
        let mut s: Vec<_> = steps.iter().map(step).collect();
        s.sort_by(|a, b| a.0.total_cmp(&b.0));
        let f: Vec<(f64, f64)> = s.iter().map(|s| (s.0, s.1)).collect();
        c1.draw_series(LineSeries::new(f.clone(), color.stroke_width(3)))
            .map_err(err)?
            .label(name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 24, y)], color.stroke_width(3))
            });
        c1.draw_series(s.iter().map(|s| {
            let style = if s.3 {
                color.filled()
            } else {
                color.stroke_width(2)
            };
            Circle::new((s.0, s.1), 5, style)
        }))
        .map_err(err)?;
        let p: Vec<(f64, f64)> = s.iter().map(|s| (s.0, s.2.min(pmax))).collect();
        c2.draw_series(LineSeries::new(p, color.stroke_width(3)))
            .map_err(err)?
            .label(name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 24, y)], color.stroke_width(3))
            });
        c2.draw_series(s.iter().map(|s| {
            let style = if s.3 {
                color.filled()
            } else {
                color.stroke_width(2)
            };
            Circle::new((s.0, s.2.min(pmax)), 5, style)
        }))
        .map_err(err)?;
    }
    c1.configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .label_font(("sans-serif", 16))
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()
        .map_err(err)?;
    c2.configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .label_font(("sans-serif", 16))
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()
        .map_err(err)?;
    root.present().map_err(err)?;
    Ok(())
}

/// The soak's samples: server RSS (top) and open descriptors (bottom) over time.
pub fn soak(path: &Path, title: &str, samples: &[Value]) -> Result<()> {
    fonts();
    let pts: Vec<(f64, f64, f64)> = samples
        .iter()
        .map(|s| {
            (
                s["t_s"].as_f64().unwrap_or(0.0),
                s["rss_mib"].as_f64().unwrap_or(0.0),
                s["fds"].as_f64().unwrap_or(0.0),
            )
        })
        .collect();
    if pts.is_empty() {
        return Err(anyhow!("no soak samples to plot"));
    }
    let tmax = pts.iter().map(|p| p.0).fold(1.0, f64::max) * 1.02;
    let rmax = pts.iter().map(|p| p.1).fold(1.0, f64::max) * 1.3;
    let fmax = pts.iter().map(|p| p.2).fold(1.0, f64::max) * 1.3;
    let root = BitMapBackend::new(path, (W, H)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let root = root.titled(title, ("sans-serif", 24)).map_err(err)?;
    let (top, bottom) = root.split_vertically(H / 2 - 20);
    for (area, idx, desc, max) in [
        (&top, 1, "server RSS (MiB)", rmax),
        (&bottom, 2, "server open descriptors", fmax),
    ] {
        let mut c = ChartBuilder::on(area)
            .margin(12)
            .x_label_area_size(35)
            .y_label_area_size(80)
            .build_cartesian_2d(0f64..tmax, 0f64..max)
            .map_err(err)?;
        c.configure_mesh()
            .x_label_formatter(&|x| format!("{x:.0}"))
            .x_desc("seconds into the soak")
            .y_desc(desc)
            .y_label_formatter(&|y| format!("{y:.0}"))
            .label_style(("sans-serif", 15))
            .axis_desc_style(("sans-serif", 17))
            .draw()
            .map_err(err)?;
        let data: Vec<(f64, f64)> = pts
            .iter()
            .map(|p| (p.0, if idx == 1 { p.1 } else { p.2 }))
            .collect();
        c.draw_series(LineSeries::new(data.clone(), MC.stroke_width(3)))
            .map_err(err)?;
        c.draw_series(data.iter().map(|&p| Circle::new(p, 4, MC.filled())))
            .map_err(err)?;
    }
    root.present().map_err(err)?;
    Ok(())
}
