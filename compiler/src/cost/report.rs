//! Rendering cost reports: a table for terminals, Markdown, stable JSON, and side-by-side
//! comparison of two architectures.

use super::{Counts, CostReport};
use serde_json::json;

/// Output format of [`render`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// Aligned columns for a terminal.
    Table,
    /// A GitHub-flavoured Markdown table.
    Markdown,
    /// Stable JSON (see [`to_json`] for the schema).
    Json,
}

/// Render `r` in `format`.
pub fn render(r: &CostReport, format: Format) -> String {
    match format {
        Format::Json => serde_json::to_string_pretty(&to_json(r)).expect("JSON of plain data") + "\n",
        Format::Table => table(r, false),
        Format::Markdown => table(r, true),
    }
}

/// The JSON form of a report. Schema (version 1), stable:
///
/// ```text
/// { "schema": 1, "model", "batch", "input": [[c,h,w]], "output": [[n]],
///   "params", "trainable_params", "frozen_params",
///   "macs",                      // conv/dense multiply-accumulates, no bias
///   "flops": { "forward", "backward", "backward_input", "backward_weight" },
///   "activation_bytes": { "inference_peak", "training_saved", "all_outputs" },
///   "backward_flops_saved",
///   "layers": [ { "name", "op", "detail", "scope", "output_shape", "params", "trainable",
///                 "macs", "flops_forward", "flops_backward_input", "flops_backward_weight",
///                 "activation_bytes", "receptive_field": [h,w], "effective_stride": [h,w] } ],
///   "blocks": [ { "name", "depth", "layers", "output_shape", "params", "macs",
///                 "flops_forward", "flops_backward", "activation_bytes" } ] }
/// ```
/// Every count is for the whole batch; `params` do not scale with it.
pub fn to_json(r: &CostReport) -> serde_json::Value {
    let t = &r.totals;
    json!({
        "schema": 1,
        "model": r.model,
        "batch": r.batch,
        "input": r.input.iter().map(|s| s.dims()).collect::<Vec<_>>(),
        "output": r.output.iter().map(|s| s.dims()).collect::<Vec<_>>(),
        "params": t.params,
        "trainable_params": t.trainable_params,
        "frozen_params": t.frozen_params,
        "macs": t.macs,
        "flops": {
            "forward": t.flops.forward,
            "backward": t.flops.backward.total(),
            "backward_input": t.flops.backward.input,
            "backward_weight": t.flops.backward.weight,
        },
        "activation_bytes": {
            "inference_peak": r.memory.inference_peak_bytes,
            "training_saved": r.memory.training_saved_bytes,
            "all_outputs": r.memory.all_outputs_bytes,
            "training_plan": r.memory.training_plan_bytes,
            "inference_plan": r.memory.inference_plan_bytes,
        },
        "backward_flops_saved": r.backward_flops_saved,
        "layers": r.layers.iter().map(|l| json!({
            "name": l.name,
            "op": l.op,
            "detail": l.detail,
            "scope": l.scope,
            "output_shape": l.output_shape.dims(),
            "params": l.counts.params,
            "trainable": l.counts.frozen_params == 0,
            "macs": l.counts.macs,
            "flops_forward": l.counts.flops.forward,
            "flops_backward_input": l.counts.flops.backward.input,
            "flops_backward_weight": l.counts.flops.backward.weight,
            "activation_bytes": l.counts.activation_bytes,
            "receptive_field": l.receptive_field,
            "effective_stride": l.effective_stride,
        })).collect::<Vec<_>>(),
        "blocks": r.blocks.iter().map(|b| json!({
            "name": b.name,
            "depth": b.depth,
            "layers": b.layer_count,
            "output_shape": b.output_shape.dims(),
            "params": b.counts.params,
            "macs": b.counts.macs,
            "flops_forward": b.counts.flops.forward,
            "flops_backward": b.counts.flops.backward.total(),
            "activation_bytes": b.counts.activation_bytes,
        })).collect::<Vec<_>>(),
    })
}

/// `1234567` -> `1,234,567`.
pub fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::with_capacity(s.len() + s.len() / 3);
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

/// Scaled with an SI suffix: `854.20M`, `15.47G`, `61.10M`.
pub fn si(n: u64) -> String {
    let x = n as f64;
    match n {
        0..=9_999 => n.to_string(),
        10_000..=999_999 => format!("{:.2}K", x / 1e3),
        1_000_000..=999_999_999 => format!("{:.2}M", x / 1e6),
        1_000_000_000..=999_999_999_999 => format!("{:.2}G", x / 1e9),
        _ => format!("{:.2}T", x / 1e12),
    }
}

/// Bytes in binary units: `3.06 MiB`.
pub fn bytes(n: u64) -> String {
    let x = n as f64;
    if n < 1024 {
        format!("{n} B")
    } else if n < 1024 * 1024 {
        format!("{:.1} KiB", x / 1024.0)
    } else if n < 1024 * 1024 * 1024 {
        format!("{:.2} MiB", x / (1024.0 * 1024.0))
    } else {
        format!("{:.2} GiB", x / (1024.0 * 1024.0 * 1024.0))
    }
}

struct Grid {
    rows: Vec<Vec<String>>,
    right: Vec<bool>,
}

impl Grid {
    fn render(&self, markdown: bool) -> String {
        let cols = self.right.len();
        let width: Vec<usize> =
            (0..cols).map(|c| self.rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0)).collect();
        let mut out = String::new();
        for (i, row) in self.rows.iter().enumerate() {
            let cells: Vec<String> = row
                .iter()
                .enumerate()
                .map(|(c, s)| {
                    let pad = width[c] - s.chars().count();
                    if self.right[c] {
                        format!("{}{s}", " ".repeat(pad))
                    } else {
                        format!("{s}{}", " ".repeat(pad))
                    }
                })
                .collect();
            if markdown {
                out.push_str(&format!("| {} |\n", cells.join(" | ")));
                if i == 0 {
                    let rule: Vec<String> = (0..cols)
                        .map(|c| if self.right[c] { format!("{}:", "-".repeat(width[c].max(2) - 1)) } else { "-".repeat(width[c].max(1)) })
                        .collect();
                    out.push_str(&format!("| {} |\n", rule.join(" | ")));
                }
            } else {
                out.push_str(cells.join("  ").trim_end());
                out.push('\n');
                if i == 0 {
                    out.push_str(&"-".repeat(width.iter().sum::<usize>() + 2 * (cols - 1)));
                    out.push('\n');
                }
            }
        }
        out
    }
}

fn counts_cells(c: &Counts) -> [String; 6] {
    [
        thousands(c.params),
        thousands(c.macs),
        si(c.flops.forward),
        si(c.flops.backward.input),
        si(c.flops.backward.weight),
        bytes(c.activation_bytes),
    ]
}

fn table(r: &CostReport, markdown: bool) -> String {
    let mut rows = vec![[
        "layer", "op", "output", "params", "MACs", "FLOPs fwd", "bwd input", "bwd weight", "activations", "RF", "stride",
    ]
    .map(String::from)
    .to_vec()];
    let indent = |depth: usize| if markdown { "&nbsp;&nbsp;".repeat(depth) } else { "  ".repeat(depth) };
    let mut next_block = 0;
    for (li, l) in r.layers.iter().enumerate() {
        while next_block < r.blocks.len() && r.blocks[next_block].first_layer == li {
            let b = &r.blocks[next_block];
            let mut row = vec![format!("{}{}", indent(b.depth), b.name), "block".into(), b.output_shape.to_string()];
            row.extend(counts_cells(&b.counts));
            row.extend([String::new(), String::new()]);
            if markdown {
                for cell in row.iter_mut().filter(|c| !c.is_empty()) {
                    *cell = format!("**{cell}**");
                }
            }
            rows.push(row);
            next_block += 1;
        }
        let short = l.name.rsplit('.').next().unwrap_or(&l.name);
        let name = if l.scope.is_empty() { l.name.clone() } else { format!("{}{short}", indent(l.scope.len())) };
        let mut row = vec![name, l.op.to_string(), l.output_shape.to_string()];
        row.extend(counts_cells(&l.counts));
        if l.counts.frozen_params > 0 {
            row[3] = format!("{} (frozen)", row[3]);
        }
        row.push(format!("{}x{}", l.receptive_field[0], l.receptive_field[1]));
        row.push(format!("{}x{}", l.effective_stride[0], l.effective_stride[1]));
        rows.push(row);
    }
    let mut total = vec!["total".to_string(), String::new(), String::new()];
    total.extend(counts_cells(&r.totals));
    total.extend([String::new(), String::new()]);
    rows.push(total);
    let grid = Grid { rows, right: vec![false, false, false, true, true, true, true, true, true, true, true] };
    let ins: Vec<String> = r.input.iter().map(|s| s.to_string()).collect();
    let outs: Vec<String> = r.output.iter().map(|s| s.to_string()).collect();
    let mut out = String::new();
    let head = format!("{}: input {} -> output {}, batch {}", r.model, ins.join(", "), outs.join(", "), r.batch);
    if markdown {
        out.push_str(&format!("### {head}\n\n"));
    } else {
        out.push_str(&format!("{head}\n\n"));
    }
    out.push_str(&grid.render(markdown));
    out.push('\n');
    out.push_str(&summary(r, markdown));
    out
}

fn summary(r: &CostReport, markdown: bool) -> String {
    let t = &r.totals;
    let bullet = if markdown { "- " } else { "  " };
    let mut s = String::new();
    let mut line = |k: &str, v: String| s.push_str(&format!("{bullet}{k:<50} {v}\n"));
    line("parameters", format!("{} ({} trainable, {} frozen)", thousands(t.params), thousands(t.trainable_params), thousands(t.frozen_params)));
    line("MACs (conv + dense, no bias)", format!("{} ({})", thousands(t.macs), si(t.macs)));
    line("FLOPs conv + dense (2 x MACs)", si(2 * t.macs));
    line("FLOPs forward (+ bias, BN, pooling, elementwise)", format!("{} ({})", thousands(t.flops.forward), si(t.flops.forward)));
    line(
        "FLOPs backward (input + weight gradients)",
        format!("{} = {} + {}", si(t.flops.backward.total()), si(t.flops.backward.input), si(t.flops.backward.weight)),
    );
    if r.backward_flops_saved > 0 {
        line("FLOPs backward saved by frozen layers", si(r.backward_flops_saved));
    }
    line("activations, inference peak (buffer reuse)", bytes(r.memory.inference_peak_bytes));
    line("activations, kept for backward (training)", bytes(r.memory.training_saved_bytes));
    let plan = |b: Option<u64>| b.map_or("-".to_string(), bytes);
    line("cnnc training plan (values + gradients + argmax)", plan(r.memory.training_plan_bytes));
    line("cnnc inference plan (values)", plan(r.memory.inference_plan_bytes));
    line("parameter memory (f32)", bytes(t.params * 4));
    s
}

/// Two reports side by side, with the ratio `b / a` for each total.
pub fn render_compare(a: &CostReport, b: &CostReport, markdown: bool) -> String {
    let ratio = |x: u64, y: u64| if x == 0 { "-".to_string() } else { format!("{:.3}x", y as f64 / x as f64) };
    let rows_of = |k: &str, x: u64, y: u64, f: fn(u64) -> String| vec![k.to_string(), f(x), f(y), ratio(x, y)];
    let shapes = |r: &CostReport| r.output.iter().map(|s| s.to_string()).collect::<Vec<_>>().join(", ");
    let mut rows = vec![vec!["".to_string(), a.model.clone(), b.model.clone(), format!("{} / {}", b.model, a.model)]];
    rows.push(vec!["output".into(), shapes(a), shapes(b), String::new()]);
    rows.push(rows_of("parameters", a.totals.params, b.totals.params, thousands));
    rows.push(rows_of("MACs (conv + dense, no bias)", a.totals.macs, b.totals.macs, thousands));
    rows.push(rows_of("FLOPs forward (all ops)", a.totals.flops.forward, b.totals.flops.forward, si));
    rows.push(rows_of("FLOPs backward", a.totals.flops.backward.total(), b.totals.flops.backward.total(), si));
    rows.push(rows_of("activations, inference peak", a.memory.inference_peak_bytes, b.memory.inference_peak_bytes, bytes));
    rows.push(rows_of("activations, kept for backward", a.memory.training_saved_bytes, b.memory.training_saved_bytes, bytes));
    rows.push(rows_of("cnnc training plan", a.memory.training_plan_bytes.unwrap_or(0), b.memory.training_plan_bytes.unwrap_or(0), bytes));
    let grid = Grid { rows, right: vec![false, true, true, true] };
    format!("batch {}\n\n{}", a.batch, grid.render(markdown))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn number_formats() {
        assert_eq!(thousands(854_196_224), "854,196,224");
        assert_eq!(thousands(12), "12");
        assert_eq!(si(854_196_224), "854.20M");
        assert_eq!(si(15_470_264_320), "15.47G");
        assert_eq!(bytes(3 * 1024 * 1024), "3.00 MiB");
    }
}
