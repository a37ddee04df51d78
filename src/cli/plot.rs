//! SVG plots of bench sweeps (plotters' SVG backend needs no fonts or native libraries).

use std::path::Path;

use anyhow::anyhow;
use plotters::prelude::*;

/// Draws GB/s against the swept parameter (log2 axis), one line per engine.
pub fn throughput_svg(
    path: &Path,
    alg: &str,
    is_qd: bool,
    series: &[(String, Vec<(f64, f64)>)],
) -> anyhow::Result<()> {
    let xs = series.iter().flat_map(|(_, p)| p.iter().map(|&(x, _)| x));
    let (xmin, xmax) = xs.fold((f64::MAX, 1f64), |(lo, hi), x| (lo.min(x), hi.max(x)));
    let ymax = series.iter().flat_map(|(_, p)| p.iter().map(|&(_, y)| y)).fold(0.0, f64::max) * 1.1 + 1e-3;
    let err = |e: &dyn std::fmt::Display| anyhow!("plotting to {}: {e}", path.display());
    let root = SVGBackend::new(path, (900, 540)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let xlabel = if is_qd { "requests in flight per queue (qd)" } else { "bytes per request" };
    let mut chart = ChartBuilder::on(&root)
        .caption(format!("crypt-vfio bench: {alg} throughput"), ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(60)
        .build_cartesian_2d((xmin.max(1.0)..xmax.max(2.0)).log_scale(), 0.0..ymax)
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc(xlabel)
        .y_desc("GB/s")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .draw()
        .map_err(|e| err(&e))?;
    for (i, (name, points)) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(points.iter().copied(), color.stroke_width(2)))
            .map_err(|e| err(&e))?
            .label(name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
        chart.draw_series(points.iter().map(|&p| Circle::new(p, 4, color.filled()))).map_err(|e| err(&e))?;
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE)
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}
