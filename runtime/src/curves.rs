//! Training curves: a CSV log appended row by row, and a PNG plot of it.
//!
//! The CSV has the header [`HEADER`] and one row per evaluation point; validation columns
//! may be empty. [`render_png`] draws two panels, loss (top) and accuracy (bottom), against
//! the step (or the epoch when every step is 0), with the train and validation series. Text
//! is rendered with plotters' `ab_glyph` backend using DejaVu Sans embedded from the `dejavu`
//! crate, so no system font is needed.

use plotters::prelude::*;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

/// The CSV header.
pub const HEADER: &str = "epoch,step,train_loss,train_acc,val_loss,val_acc,lr,images_per_s";

/// Errors of the curve log and plot; messages name the file.
#[derive(Debug, thiserror::Error)]
pub enum CurvesError {
    /// An OS-level error on `path`.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Malformed CSV content, or nothing to plot.
    #[error("{0}")]
    Format(String),
    /// The plotting library failed.
    #[error("{0}")]
    Plot(String),
}

fn io(path: &Path, source: std::io::Error) -> CurvesError {
    CurvesError::Io { path: path.to_path_buf(), source }
}

/// One point of the training curves.
#[derive(Debug, Clone, PartialEq)]
pub struct CurveRow {
    /// Epoch (0-based or 1-based, as the trainer counts).
    pub epoch: u64,
    /// Optimiser steps so far.
    pub step: u64,
    /// Mean training loss since the previous row.
    pub train_loss: f64,
    /// Training accuracy since the previous row (fraction in `[0, 1]`).
    pub train_acc: f64,
    /// Validation loss, if evaluated.
    pub val_loss: Option<f64>,
    /// Validation accuracy, if evaluated.
    pub val_acc: Option<f64>,
    /// Learning rate in use.
    pub lr: f64,
    /// Training throughput.
    pub images_per_s: f64,
}

impl CurveRow {
    /// The CSV line (no newline); `None` is an empty field.
    pub fn to_csv(&self) -> String {
        let opt = |v: Option<f64>| v.map(|v| v.to_string()).unwrap_or_default();
        format!(
            "{},{},{},{},{},{},{},{}",
            self.epoch,
            self.step,
            self.train_loss,
            self.train_acc,
            opt(self.val_loss),
            opt(self.val_acc),
            self.lr,
            self.images_per_s
        )
    }

    /// Parses a CSV line; `what` (file and line) is used in errors.
    pub fn from_csv(line: &str, what: &str) -> Result<Self, CurvesError> {
        let f: Vec<&str> = line.trim_end_matches('\r').split(',').collect();
        if f.len() != 8 {
            return Err(CurvesError::Format(format!("{what}: expected 8 fields ({HEADER}), found {}", f.len())));
        }
        let bad = |col: &str, v: &str| CurvesError::Format(format!("{what}: {col} '{v}' is not a number"));
        let int = |i: usize, col: &str| f[i].trim().parse::<u64>().map_err(|_| bad(col, f[i]));
        let float = |i: usize, col: &str| f[i].trim().parse::<f64>().map_err(|_| bad(col, f[i]));
        let opt = |i: usize, col: &str| if f[i].trim().is_empty() { Ok(None) } else { float(i, col).map(Some) };
        Ok(CurveRow {
            epoch: int(0, "epoch")?,
            step: int(1, "step")?,
            train_loss: float(2, "train_loss")?,
            train_acc: float(3, "train_acc")?,
            val_loss: opt(4, "val_loss")?,
            val_acc: opt(5, "val_acc")?,
            lr: float(6, "lr")?,
            images_per_s: float(7, "images_per_s")?,
        })
    }
}

/// An append-only CSV curve log; each row is flushed as it is written, so the file is
/// readable (e.g. plotted) while training runs.
#[derive(Debug)]
pub struct CurveLog {
    path: PathBuf,
    file: File,
}

impl CurveLog {
    /// Opens `path` for appending, writing the header if the file is new or empty; an
    /// existing file must start with [`HEADER`] (so a resumed run continues its log).
    pub fn open(path: &Path) -> Result<Self, CurvesError> {
        let existing = match std::fs::read_to_string(path) {
            Ok(s) => s,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(io(path, e)),
        };
        if !existing.is_empty() && existing.lines().next().map(|l| l.trim_end_matches('\r')) != Some(HEADER) {
            return Err(CurvesError::Format(format!(
                "{}: exists but is not a curve log (first line is not '{HEADER}')",
                path.display()
            )));
        }
        let mut file = OpenOptions::new().create(true).append(true).open(path).map_err(|e| io(path, e))?;
        if existing.is_empty() {
            writeln!(file, "{HEADER}").map_err(|e| io(path, e))?;
        } else if !existing.ends_with('\n') {
            writeln!(file).map_err(|e| io(path, e))?;
        }
        file.flush().map_err(|e| io(path, e))?;
        Ok(CurveLog { path: path.to_path_buf(), file })
    }

    /// Appends one row.
    pub fn append(&mut self, row: &CurveRow) -> Result<(), CurvesError> {
        writeln!(self.file, "{}", row.to_csv()).map_err(|e| io(&self.path, e))?;
        self.file.flush().map_err(|e| io(&self.path, e))
    }

    /// The log's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Reads a curve log written by [`CurveLog`].
pub fn read_csv(path: &Path) -> Result<Vec<CurveRow>, CurvesError> {
    let s = std::fs::read_to_string(path).map_err(|e| io(path, e))?;
    let mut lines = s.lines();
    if lines.next().map(|l| l.trim_end_matches('\r')) != Some(HEADER) {
        return Err(CurvesError::Format(format!("{}: line 1: expected the header '{HEADER}'", path.display())));
    }
    lines
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| CurveRow::from_csv(l, &format!("{} line {}", path.display(), i + 2)))
        .collect()
}

fn register_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // Cannot fail for the bundled font; if it did, text would be missing, not the plot.
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular());
    });
}

fn range(values: impl Iterator<Item = f64>, floor_zero: bool) -> (f64, f64) {
    let (mut lo, mut hi) = values
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| (a.min(v), b.max(v)));
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    if floor_zero {
        lo = lo.min(0.0);
    }
    if hi - lo < 1e-12 {
        hi = lo + 1.0;
    }
    let pad = (hi - lo) * 0.05;
    (if floor_zero && lo >= 0.0 { lo } else { lo - pad }, hi + pad)
}

type Series = (&'static str, RGBColor, Vec<(f64, f64)>);

fn panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    title: &str,
    x_label: &str,
    x_range: (f64, f64),
    y_range: (f64, f64),
    series: &[Series],
    legend: SeriesLabelPosition,
) -> Result<(), String> {
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 18))
        .margin(8)
        .x_label_area_size(34)
        .y_label_area_size(56)
        .build_cartesian_2d(x_range.0..x_range.1, y_range.0..y_range.1)
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .label_style(("sans-serif", 12))
        .light_line_style(RGBColor(235, 235, 235))
        .draw()
        .map_err(|e| e.to_string())?;
    for (name, colour, pts) in series {
        if pts.is_empty() {
            continue;
        }
        let c = *colour;
        chart
            .draw_series(LineSeries::new(pts.iter().copied(), c.stroke_width(2)))
            .map_err(|e| e.to_string())?
            .label(*name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2)));
        if pts.len() == 1 {
            chart
                .draw_series(pts.iter().map(|&p| Circle::new(p, 3, c.filled())))
                .map_err(|e| e.to_string())?;
        }
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 12))
        .position(legend)
        .draw()
        .map_err(|e| e.to_string())?;
    Ok(())
}

/// Colour of the training series.
pub const TRAIN_COLOUR: RGBColor = RGBColor(31, 119, 180);
/// Colour of the validation series.
pub const VAL_COLOUR: RGBColor = RGBColor(214, 39, 40);

/// Renders `rows` as a `width x height` PNG at `path`: loss on top, accuracy below
/// (non-finite values are skipped).
pub fn render_png(rows: &[CurveRow], path: &Path, width: u32, height: u32) -> Result<(), CurvesError> {
    if rows.is_empty() {
        return Err(CurvesError::Format(format!("{}: no curve rows to plot", path.display())));
    }
    if !(200..=8000).contains(&width) || !(200..=8000).contains(&height) {
        return Err(CurvesError::Format(format!("plot size {width}x{height} must be within 200..=8000 pixels")));
    }
    register_font();
    let by_step = rows.iter().any(|r| r.step > 0);
    let x = |r: &CurveRow| if by_step { r.step as f64 } else { r.epoch as f64 };
    let x_label = if by_step { "step" } else { "epoch" };
    let pts = |f: &dyn Fn(&CurveRow) -> Option<f64>| -> Vec<(f64, f64)> {
        rows.iter().filter_map(|r| f(r).filter(|v| v.is_finite()).map(|v| (x(r), v))).collect()
    };
    let loss: Vec<Series> = vec![
        ("train loss", TRAIN_COLOUR, pts(&|r| Some(r.train_loss))),
        ("val loss", VAL_COLOUR, pts(&|r| r.val_loss)),
    ];
    let acc: Vec<Series> = vec![
        ("train acc", TRAIN_COLOUR, pts(&|r| Some(r.train_acc))),
        ("val acc", VAL_COLOUR, pts(&|r| r.val_acc)),
    ];
    let (x0, x1) = range(rows.iter().map(x), false);
    let x_range = (x0.max(rows.iter().map(x).fold(f64::INFINITY, f64::min) - (x1 - x0) * 0.02), x1);
    let y_loss = range(loss.iter().flat_map(|s| s.2.iter().map(|p| p.1)), true);
    let (alo, ahi) = range(acc.iter().flat_map(|s| s.2.iter().map(|p| p.1)), false);
    let y_acc = (alo.max(0.0), if ahi <= 1.05 { ahi.min(1.0) + 0.02 } else { ahi });

    let mut buf = vec![0u8; width as usize * height as usize * 3];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (width, height)).into_drawing_area();
        let draw = || -> Result<(), String> {
            root.fill(&WHITE).map_err(|e| e.to_string())?;
            let panels = root.split_evenly((2, 1));
            panel(&panels[0], "loss", x_label, x_range, y_loss, &loss, SeriesLabelPosition::UpperRight)?;
            panel(&panels[1], "accuracy", x_label, x_range, y_acc, &acc, SeriesLabelPosition::LowerRight)?;
            root.present().map_err(|e| e.to_string())
        };
        draw().map_err(|e| CurvesError::Plot(format!("{}: cannot draw the plot: {e}", path.display())))?;
    }
    let img = image::RgbImage::from_raw(width, height, buf)
        .ok_or_else(|| CurvesError::Plot("plot buffer has the wrong size".into()))?;
    let mut png = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .map_err(|e| CurvesError::Plot(format!("{}: cannot encode PNG: {e}", path.display())))?;
    std::fs::write(path, png).map_err(|e| io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(n: u64) -> Vec<CurveRow> {
        (0..n)
            .map(|i| CurveRow {
                epoch: i / 4,
                step: (i + 1) * 50,
                train_loss: 2.3 * (-(i as f64) / 6.0).exp() + 0.05,
                train_acc: 1.0 - 0.9 * (-(i as f64) / 5.0).exp(),
                val_loss: (i % 4 == 3).then(|| 2.4 * (-(i as f64) / 6.0).exp() + 0.1),
                val_acc: (i % 4 == 3).then(|| 1.0 - 0.9 * (-(i as f64) / 5.5).exp() - 0.02),
                lr: 0.01,
                images_per_s: 1234.5,
            })
            .collect()
    }

    #[test]
    fn csv_round_trip_and_resume() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("curves.csv");
        let r = rows(6);
        {
            let mut log = CurveLog::open(&p).unwrap();
            for row in &r[..4] {
                log.append(row).unwrap();
            }
        }
        {
            let mut log = CurveLog::open(&p).unwrap(); // resumed: no second header
            for row in &r[4..] {
                log.append(row).unwrap();
            }
        }
        let text = std::fs::read_to_string(&p).unwrap();
        assert_eq!(text.matches("epoch,step").count(), 1);
        assert_eq!(text.lines().nth(1).unwrap(), "0,50,2.3499999999999996,0.09999999999999998,,,0.01,1234.5");
        assert_eq!(read_csv(&p).unwrap(), r);
        std::fs::write(&p, format!("{HEADER}\n1,2,x,4,,,7,8\n")).unwrap();
        let e = read_csv(&p).unwrap_err().to_string();
        assert!(e.contains("line 2: train_loss 'x' is not a number"), "{e}");
        std::fs::write(&p, "something else\n").unwrap();
        assert!(CurveLog::open(&p).is_err());
        assert!(read_csv(&p).is_err());
    }

    #[test]
    fn png_is_written_with_the_right_size_and_content() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("curves.png");
        render_png(&rows(24), &p, 800, 600).unwrap();
        if let Ok(dir) = std::env::var("CNNC_KEEP_PLOT") {
            std::fs::copy(&p, Path::new(&dir).join("curves.png")).unwrap();
        }
        let img = image::open(&p).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), (800, 600));
        let count = |c: RGBColor| img.pixels().filter(|px| px.0 == [c.0, c.1, c.2]).count();
        assert!(count(TRAIN_COLOUR) > 500, "train curves drawn");
        assert!(count(VAL_COLOUR) > 300, "validation curves drawn");
        // Text is anti-aliased grey; axes and labels put many dark pixels in the left margin.
        let dark_left = img.enumerate_pixels().filter(|(x, _, px)| *x < 50 && px.0[0] < 100).count();
        assert!(dark_left > 200, "axis tick labels rendered ({dark_left} dark pixels)");
        // Degenerate inputs: a single row, non-finite values, nothing at all.
        let mut one = rows(1);
        one[0].train_loss = f64::NAN;
        render_png(&one, &p, 300, 200).unwrap();
        assert!(render_png(&[], &p, 300, 200).is_err());
        assert!(render_png(&rows(3), &p, 10, 10).is_err());
    }
}
