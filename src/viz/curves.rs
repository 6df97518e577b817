//! Training curves from the trainer's JSON-lines log: loss (total, MSE, VB), FLOPs ratio against
//! the target λ schedule, and gradient norm with skipped steps, all against the step.

use super::canvas::{Canvas, BLACK};
use image::{Rgb, RgbImage};
use serde_json::{Map, Value};
use std::collections::BTreeMap;

/// One logging interval's metrics: a `"event":"step"` line (or a line without `event`).
/// A metric the line does not carry (or carries as `null`, which is how serde_json writes a
/// non-finite float) is `None`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StepRecord {
    pub step: u64,
    pub epoch: Option<f64>,
    /// Total loss.
    pub loss: Option<f64>,
    pub mse: Option<f64>,
    pub vb: Option<f64>,
    pub flops_loss: Option<f64>,
    /// FLOPs ratio the dynamic model spent (DyDiT only).
    pub ratio: Option<f64>,
    /// Target FLOPs ratio λ at this step.
    pub target: Option<f64>,
    pub grad_norm: Option<f64>,
    /// Optimizer steps skipped in this logging interval (non-finite loss or gradients); 0 when
    /// absent.
    pub skipped: u64,
    pub lr: Option<f64>,
    pub steps_per_s: Option<f64>,
    pub elapsed_s: Option<f64>,
}

/// A `"event":"checkpoint"` line.
#[derive(Clone, Debug, PartialEq)]
pub struct Checkpoint {
    pub step: Option<u64>,
    pub path: Option<String>,
}

/// A parsed training log.
#[derive(Clone, Debug, Default)]
pub struct TrainLog {
    /// One record per step, sorted by step; when a step was logged more than once (a resumed
    /// run), the line written last wins.
    pub steps: Vec<StepRecord>,
    pub checkpoints: Vec<Checkpoint>,
    /// `"event":"resume"` lines.
    pub resumes: usize,
    /// Records replaced by a later line for the same step.
    pub overwritten: usize,
    /// Records dropped because a later `resume` line restarted from an earlier step (they belong
    /// to the abandoned continuation of the killed run).
    pub abandoned: usize,
    /// Lines with other events (`eval`, …, and `start`), not plotted.
    pub other_events: usize,
    /// Incomplete lines of a run killed mid-write, skipped: the last line, or the cut-off head
    /// of a line that a resumed run appended to.
    pub partial_lines: usize,
    /// The last `"event":"start"` line (the run's config), if any.
    pub start: Option<Value>,
}

impl TrainLog {
    pub fn first_step(&self) -> Option<u64> {
        self.steps.first().map(|r| r.step)
    }

    pub fn last_step(&self) -> Option<u64> {
        self.steps.last().map(|r| r.step)
    }

    /// The last value of a metric, with its step.
    pub fn last(&self, f: impl Fn(&StepRecord) -> Option<f64>) -> Option<(u64, f64)> {
        self.steps
            .iter()
            .rev()
            .find_map(|r| f(r).map(|v| (r.step, v)))
    }

    /// The smallest finite total loss, with its step (the first one on ties).
    pub fn min_loss(&self) -> Option<(u64, f64)> {
        self.steps
            .iter()
            .filter_map(|r| r.loss.filter(|v| v.is_finite()).map(|v| (r.step, v)))
            .fold(None, |best, (s, v)| match best {
                Some((_, b)) if b <= v => best,
                _ => Some((s, v)),
            })
    }

    /// Optimizer steps skipped, summed over the logging intervals.
    pub fn skipped_total(&self) -> u64 {
        self.steps
            .iter()
            .fold(0, |n: u64, r| n.saturating_add(r.skipped))
    }

    /// A string field of the `start` line, at its top level or in its `config` object.
    pub fn start_str(&self, key: &str) -> Option<&str> {
        let s = self.start.as_ref()?;
        s.get(key)
            .and_then(Value::as_str)
            .or_else(|| s.get("config")?.get(key)?.as_str())
    }
}

/// Parses a JSON-lines training log. Blank lines are skipped; an incomplete last line (no
/// newline after it, or cut off mid-object), or a cut-off object with a complete one appended
/// on the same line, counts in [`TrainLog::partial_lines`]; any other malformed line is an
/// error naming its line number.
pub fn parse_log(text: &str) -> anyhow::Result<TrainLog> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let lines: Vec<&str> = text.lines().collect();
    let last_line = lines.iter().rposition(|l| !l.trim().is_empty());
    let unterminated = !text.ends_with('\n');
    let mut log = TrainLog::default();
    let mut by_step: BTreeMap<u64, StepRecord> = BTreeMap::new();
    for (i, line) in lines.iter().enumerate() {
        let (n, line) = (i + 1, line.trim());
        if line.is_empty() {
            continue;
        }
        let obj = match serde_json::from_str::<Value>(line) {
            Ok(Value::Object(o)) => o,
            Ok(other) => anyhow::bail!("line {n}: expected a JSON object, got {}", kind(&other)),
            Err(e) if Some(i) == last_line && (unterminated || e.is_eof()) => {
                log.partial_lines += 1;
                continue;
            }
            Err(e) => match spliced(line) {
                Some(o) => {
                    log.partial_lines += 1;
                    o
                }
                None => {
                    // serde_json says "at line 1 column C" of this one line: name the file's line.
                    let msg = e.to_string();
                    let msg = msg.rsplit_once(" at line ").map_or(msg.as_str(), |p| p.0);
                    anyhow::bail!("line {n}, column {}: malformed JSON: {msg}", e.column());
                }
            },
        };
        let event = match obj.get("event") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.as_str()),
            Some(other) => {
                anyhow::bail!("line {n}: \"event\" must be a string, got {}", kind(other))
            }
        };
        match event {
            None | Some("step") => {
                let step = match obj.get("step") {
                    Some(v) => step_value(v).ok_or_else(|| {
                        anyhow::anyhow!(
                            "line {n}: bad \"step\" {v}: expected a non-negative integer"
                        )
                    })?,
                    // A line without `event` nor `step` is not a step record.
                    None if event.is_none() => {
                        log.other_events += 1;
                        continue;
                    }
                    None => anyhow::bail!("line {n}: step record without \"step\""),
                };
                let rec = StepRecord {
                    step,
                    epoch: number(&obj, "epoch"),
                    loss: number(&obj, "loss"),
                    mse: number(&obj, "mse"),
                    vb: number(&obj, "vb"),
                    flops_loss: number(&obj, "flops_loss"),
                    ratio: number(&obj, "ratio"),
                    target: number(&obj, "target"),
                    grad_norm: number(&obj, "grad_norm"),
                    skipped: match obj.get("skipped") {
                        Some(Value::Bool(b)) => *b as u64,
                        _ => number(&obj, "skipped")
                            .filter(|v| v.is_finite() && *v > 0.0)
                            .map_or(0, |v| v.round() as u64),
                    },
                    lr: number(&obj, "lr"),
                    steps_per_s: number(&obj, "steps_per_s"),
                    elapsed_s: number(&obj, "elapsed_s"),
                };
                if by_step.insert(step, rec).is_some() {
                    log.overwritten += 1;
                }
            }
            Some("resume") => {
                log.resumes += 1;
                // Records logged past the step the run restarts from belong to the abandoned
                // continuation: drop them now rather than splice them between the new ones.
                if let Some(s) = obj.get("step").and_then(step_value) {
                    if let Some(next) = s.checked_add(1) {
                        log.abandoned += by_step.split_off(&next).len();
                    }
                }
            }
            Some("checkpoint") => log.checkpoints.push(Checkpoint {
                step: obj.get("step").and_then(step_value),
                path: obj.get("path").and_then(Value::as_str).map(str::to_owned),
            }),
            Some("start") => {
                log.other_events += 1;
                log.start = Some(Value::Object(obj));
            }
            Some(_) => log.other_events += 1,
        }
    }
    log.steps = by_step.into_values().collect();
    Ok(log)
}

/// A line made of a cut-off object followed by a complete one: a run killed mid-write whose
/// resumed run appended to the log right after the partial line. Returns the complete object.
fn spliced(line: &str) -> Option<Map<String, Value>> {
    line.match_indices('{').skip(1).find_map(|(p, _)| {
        let head_cut = matches!(serde_json::from_str::<Value>(&line[..p]), Err(e) if e.is_eof());
        match serde_json::from_str::<Value>(&line[p..]) {
            Ok(Value::Object(o)) if head_cut => Some(o),
            _ => None,
        }
    })
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A step number: a non-negative integer (also written as `1200.0`).
fn step_value(v: &Value) -> Option<u64> {
    v.as_u64().or_else(|| {
        v.as_f64()
            .filter(|f| f.is_finite() && *f >= 0.0 && f.fract() == 0.0 && *f < 2f64.powi(63))
            .map(|f| f as u64)
    })
}

/// A metric: a number, or a string such as `"NaN"` / `"inf"`; anything else is absent.
fn number(obj: &Map<String, Value>, key: &str) -> Option<f64> {
    match obj.get(key)? {
        Value::Number(x) => x.as_f64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------------
// Drawing

/// Width of the picture in pixels.
pub const WIDTH: u32 = 960;
const LEFT: i64 = 80;
const RIGHT: i64 = 24;
const TOP: i64 = 40;
/// Above each plot: its name and legend.
const HEADER: i64 = 22;
const PLOT_H: i64 = 200;
/// Below each plot: its step tick labels.
const FOOT: i64 = 26;
const BOTTOM: i64 = 14;

const LOSS: Rgb<u8> = Rgb([31, 119, 180]);
const MSE: Rgb<u8> = Rgb([255, 127, 14]);
const VB: Rgb<u8> = Rgb([44, 160, 44]);
const RATIO: Rgb<u8> = Rgb([148, 103, 189]);
const TARGET: Rgb<u8> = Rgb([60, 60, 60]);
const GRAD: Rgb<u8> = Rgb([23, 150, 160]);
const SKIP: Rgb<u8> = Rgb([214, 39, 40]);
const SKIP_BAND: Rgb<u8> = Rgb([250, 210, 210]);
const CKPT: Rgb<u8> = Rgb([120, 120, 120]);
const GRID: Rgb<u8> = Rgb([232, 232, 232]);
const SUBTLE: Rgb<u8> = Rgb([90, 90, 90]);

/// The panels a log gets, top to bottom.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Panel {
    /// Total loss, MSE and VB (always).
    Loss,
    /// FLOPs ratio and target λ (when the log has `ratio`).
    Ratio,
    /// Gradient norm and skipped steps (when the log has `grad_norm` or skipped steps).
    GradNorm,
}

pub fn panels(log: &TrainLog) -> Vec<Panel> {
    let has = |f: fn(&StepRecord) -> Option<f64>| {
        log.steps
            .iter()
            .any(|r| f(r).is_some_and(|v| v.is_finite()))
    };
    let mut p = vec![Panel::Loss];
    if has(|r| r.ratio) {
        p.push(Panel::Ratio);
    }
    if has(|r| r.grad_norm) || log.skipped_total() > 0 {
        p.push(Panel::GradNorm);
    }
    p
}

/// Height of the picture for `panels` panels.
pub fn image_height(panels: usize) -> u32 {
    (TOP + panels.max(1) as i64 * (HEADER + PLOT_H + FOOT) + BOTTOM) as u32
}

/// Plot area `(x, y, w, h)` of the `i`-th panel (inside its frame).
pub fn plot_area(i: usize) -> (i64, i64, i64, i64) {
    (
        LEFT,
        TOP + i as i64 * (HEADER + PLOT_H + FOOT) + HEADER,
        WIDTH as i64 - LEFT - RIGHT,
        PLOT_H,
    )
}

/// Training curves of `log`, one panel per [`panels`] entry, sharing the step axis: (a) total
/// loss (a moving average over ~1/50 of the points drawn over the raw values when there are
/// enough), MSE and VB, on a log scale when they span more than a decade; (b) FLOPs ratio with
/// the target λ dashed; (c) gradient norm on a log scale, skipped steps marked in red.
/// Checkpoints are marked under the loss. An empty log gives empty panels, never a panic.
pub fn training_curves(log: &TrainLog, title: &str) -> RgbImage {
    let panels = panels(log);
    let mut c = Canvas::new(WIDTH, image_height(panels.len()));
    let max_chars = ((WIDTH as i64 - LEFT - RIGHT) / 12) as usize;
    let title: String = title.chars().take(max_chars).collect();
    c.text(LEFT, 8, &title, 2, BLACK);
    c.text(LEFT, 27, &subtitle(log), 1, SUBTLE);
    let x = match (log.first_step(), log.last_step()) {
        (Some(a), Some(b)) => Axis::linear(a as f64, b as f64, 0.0),
        _ => Axis::linear(0.0, 1.0, 0.0),
    };
    for (i, p) in panels.iter().enumerate() {
        let area = plot_area(i);
        match p {
            Panel::Loss => loss_panel(&mut c, log, area, &x),
            Panel::Ratio => ratio_panel(&mut c, log, area, &x),
            Panel::GradNorm => grad_panel(&mut c, log, area, &x),
        }
    }
    let (ax, ay, aw, ah) = plot_area(panels.len() - 1);
    c.text(
        ax + aw - Canvas::text_width("step", 1),
        ay + ah + 16,
        "step",
        1,
        BLACK,
    );
    c.img
}

fn subtitle(log: &TrainLog) -> String {
    let plural = |n: usize, w: &str| format!("{n} {w}{}", if n == 1 { "" } else { "s" });
    let mut s = plural(log.steps.len(), "record");
    if let (Some(a), Some(b)) = (log.first_step(), log.last_step()) {
        s += &format!(", steps {a}-{b}");
    }
    for (n, w) in [
        (log.resumes, "resume"),
        (log.checkpoints.len(), "checkpoint"),
        (log.skipped_total() as usize, "skipped step"),
    ] {
        if n > 0 {
            s += &format!(", {}", plural(n, w));
        }
    }
    s
}

type Area = (i64, i64, i64, i64);

#[derive(Clone, Copy, Debug, PartialEq)]
enum Style {
    Line,
    Thick,
    Dashed,
    /// Legend only: a marker.
    Marker,
}

fn series(log: &TrainLog, f: impl Fn(&StepRecord) -> Option<f64>) -> Vec<(f64, f64)> {
    log.steps
        .iter()
        .filter_map(|r| f(r).filter(|v| v.is_finite()).map(|v| (r.step as f64, v)))
        .collect()
}

fn loss_panel(c: &mut Canvas, log: &TrainLog, area: Area, x: &Axis) {
    let loss = series(log, |r| r.loss);
    let mse = series(log, |r| r.mse);
    // A flow-matching (SiT) or fixed-variance run logs vb = 0 throughout: no curve for it.
    let mut vb = series(log, |r| r.vb);
    if vb.iter().all(|p| p.1 == 0.0) {
        vb.clear();
    }
    let all = loss.iter().chain(&mse).chain(&vb).map(|p| p.1);
    let Some(y) = Axis::auto(all) else {
        empty_panel(c, area, x, "loss", "no loss values");
        return;
    };
    axes(c, area, x, &y);
    let (ax, ay, _, ah) = area;
    for ck in &log.checkpoints {
        if let Some(s) = ck.step.filter(|&s| x.contains(s as f64)) {
            triangle(c, px(area, x, s as f64), ay + ah - 1, false, CKPT);
        }
    }
    let window = loss.len() / 50;
    let smooth = window >= 3;
    let raw = if smooth { lighten(LOSS, 0.6) } else { LOSS };
    draw_series(c, area, x, &y, &loss, raw, Style::Line);
    draw_series(c, area, x, &y, &vb, VB, Style::Line);
    draw_series(c, area, x, &y, &mse, MSE, Style::Line);
    let mut legend = vec![("loss".to_string(), raw, Style::Line)];
    if smooth {
        let vals: Vec<f64> = loss.iter().map(|p| p.1).collect();
        let ma: Vec<(f64, f64)> = loss
            .iter()
            .zip(moving_average(&vals, window))
            .map(|(p, m)| (p.0, m))
            .collect();
        draw_series(c, area, x, &y, &ma, LOSS, Style::Thick);
        legend.push((format!("loss, mean of {window}"), LOSS, Style::Thick));
    }
    if !mse.is_empty() {
        legend.push(("mse".into(), MSE, Style::Line));
    }
    if !vb.is_empty() {
        legend.push(("vb".into(), VB, Style::Line));
    }
    if !log.checkpoints.is_empty() {
        legend.push(("checkpoint".into(), CKPT, Style::Marker));
    }
    header(c, ax, ay, &axis_name("loss", &y), &legend);
}

fn ratio_panel(c: &mut Canvas, log: &TrainLog, area: Area, x: &Axis) {
    let ratio = series(log, |r| r.ratio);
    let target = series(log, |r| r.target);
    let Some(y) = Axis::fit(
        ratio.iter().chain(&target).map(|p| p.1),
        Scale::Linear,
        0.08,
    ) else {
        empty_panel(c, area, x, "FLOPs ratio", "no ratio values");
        return;
    };
    axes(c, area, x, &y);
    draw_series(c, area, x, &y, &target, TARGET, Style::Dashed);
    draw_series(c, area, x, &y, &ratio, RATIO, Style::Line);
    let mut legend = vec![("ratio".to_string(), RATIO, Style::Line)];
    if !target.is_empty() {
        legend.push(("target".into(), TARGET, Style::Dashed));
    }
    header(c, area.0, area.1, "FLOPs ratio", &legend);
}

fn grad_panel(c: &mut Canvas, log: &TrainLog, area: Area, x: &Axis) {
    let grad = series(log, |r| r.grad_norm);
    let y = Axis::fit(grad.iter().map(|p| p.1), Scale::Log, 0.05)
        .or_else(|| Axis::fit(grad.iter().map(|p| p.1), Scale::Linear, 0.05));
    let (ax, ay, _, ah) = area;
    let skipped: Vec<f64> = log
        .steps
        .iter()
        .filter(|r| r.skipped > 0)
        .map(|r| r.step as f64)
        .collect();
    match &y {
        Some(y) => axes(c, area, x, y),
        None => empty_panel(c, area, x, "grad norm", "no grad norm values"),
    }
    for &s in &skipped {
        let sx = px(area, x, s);
        c.line(sx, ay, sx, ay + ah - 1, SKIP_BAND);
    }
    if let Some(y) = &y {
        draw_series(c, area, x, y, &grad, GRAD, Style::Line);
    }
    for &s in &skipped {
        triangle(c, px(area, x, s), ay, true, SKIP);
    }
    let mut legend = Vec::new();
    if !grad.is_empty() {
        legend.push(("grad norm".to_string(), GRAD, Style::Line));
    }
    if !skipped.is_empty() {
        legend.push(("skipped".into(), SKIP, Style::Marker));
    }
    let name = y.map_or("grad norm".into(), |y| axis_name("grad norm", &y));
    header(c, ax, ay, &name, &legend);
}

fn axis_name(name: &str, y: &Axis) -> String {
    if y.log {
        format!("{name} (log scale)")
    } else {
        name.to_string()
    }
}

/// A panel without values: frame, step ticks and a note.
fn empty_panel(c: &mut Canvas, area: Area, x: &Axis, name: &str, note: &str) {
    let (ax, ay, aw, ah) = area;
    step_ticks(c, area, x);
    c.frame(ax - 1, ay - 1, aw + 2, ah + 2, BLACK);
    c.text(
        ax + (aw - Canvas::text_width(note, 1)) / 2,
        ay + ah / 2 - 3,
        note,
        1,
        SUBTLE,
    );
    c.text(ax, ay - 14, name, 1, BLACK);
}

/// Panel name on the left and legend on the right, above the plot area.
fn header(c: &mut Canvas, ax: i64, ay: i64, name: &str, legend: &[(String, Rgb<u8>, Style)]) {
    let ty = ay - 14;
    c.text(ax, ty, name, 1, BLACK);
    const SWATCH: i64 = 16;
    let total: i64 = legend
        .iter()
        .map(|(l, _, _)| SWATCH + 4 + Canvas::text_width(l, 1) + 14)
        .sum::<i64>()
        - 14;
    let mut lx = (WIDTH as i64 - RIGHT - total).max(ax + Canvas::text_width(name, 1) + 20);
    for (label, col, style) in legend {
        let my = ty + 3;
        match style {
            Style::Line => c.line(lx, my, lx + SWATCH - 1, my, *col),
            Style::Thick => c.rect(lx, my - 1, SWATCH, 2, *col),
            Style::Dashed => c.dashed_polyline(&[(lx, my), (lx + SWATCH - 1, my)], *col, 6, 4),
            Style::Marker => triangle(c, lx + SWATCH / 2, my - 2, true, *col),
        }
        lx += SWATCH + 4;
        lx += c.text(lx, ty, label, 1, BLACK) + 14;
    }
}

/// Small triangle (9 pixels wide, 5 high) centred on `x` with its base on row `base`: pointing
/// down from there (`down`), or up.
fn triangle(c: &mut Canvas, x: i64, base: i64, down: bool, col: Rgb<u8>) {
    for k in 0..5 {
        let y = if down { base + k } else { base - k };
        c.line(x - (4 - k), y, x + (4 - k), y, col);
    }
}

fn lighten(c: Rgb<u8>, f: f64) -> Rgb<u8> {
    let m = |v: u8| (v as f64 + f * (255.0 - v as f64)).round() as u8;
    Rgb([m(c[0]), m(c[1]), m(c[2])])
}

/// Centred moving average over `window` values (shorter at the ends).
fn moving_average(v: &[f64], window: usize) -> Vec<f64> {
    let w = window.max(1);
    let mut prefix = Vec::with_capacity(v.len() + 1);
    prefix.push(0.0);
    for x in v {
        prefix.push(prefix.last().unwrap() + x);
    }
    (0..v.len())
        .map(|i| {
            let lo = i.saturating_sub(w / 2);
            let hi = (i + w - w / 2).min(v.len());
            (prefix[hi] - prefix[lo]) / (hi - lo) as f64
        })
        .collect()
}

fn px(area: Area, x: &Axis, v: f64) -> i64 {
    area.0 + (x.frac(v).clamp(0.0, 1.0) * (area.2 - 1) as f64).round() as i64
}

fn py(area: Area, y: &Axis, v: f64) -> i64 {
    area.1 + ((1.0 - y.frac(v).clamp(0.0, 1.0)) * (area.3 - 1) as f64).round() as i64
}

fn draw_series(
    c: &mut Canvas,
    area: Area,
    x: &Axis,
    y: &Axis,
    pts: &[(f64, f64)],
    col: Rgb<u8>,
    style: Style,
) {
    let mut p: Vec<(i64, i64)> = Vec::with_capacity(pts.len());
    for &(s, v) in pts {
        if !v.is_finite() || (y.log && v <= 0.0) {
            continue;
        }
        let q = (px(area, x, s), py(area, y, v));
        if p.last() != Some(&q) {
            p.push(q);
        }
    }
    if let [(qx, qy)] = p[..] {
        c.rect(qx - 1, qy - 1, 3, 3, col);
        return;
    }
    match style {
        Style::Dashed => c.dashed_polyline(&p, col, 6, 4),
        _ => {
            for w in p.windows(2) {
                c.line(w[0].0, w[0].1, w[1].0, w[1].1, col);
                if style == Style::Thick {
                    c.line(w[0].0, w[0].1 - 1, w[1].0, w[1].1 - 1, col);
                }
            }
        }
    }
}

/// Grid, ticks, tick labels and frame of a plot area.
fn axes(c: &mut Canvas, area: Area, x: &Axis, y: &Axis) {
    let (ax, ay, aw, ah) = area;
    let mut last_label: Option<i64> = None;
    // Highest tick first, so that of two crowded labels the upper one is kept.
    for (v, label) in y.ticks().into_iter().rev() {
        let yy = py(area, y, v);
        c.line(ax, yy, ax + aw - 1, yy, GRID);
        c.line(ax - 5, yy, ax - 2, yy, BLACK);
        if last_label.is_none_or(|l| yy - l >= 10) {
            c.text(
                ax - 8 - Canvas::text_width(&label, 1),
                yy - 3,
                &label,
                1,
                BLACK,
            );
            last_label = Some(yy);
        }
    }
    step_ticks(c, area, x);
    c.frame(ax - 1, ay - 1, aw + 2, ah + 2, BLACK);
}

fn step_ticks(c: &mut Canvas, area: Area, x: &Axis) {
    let (ax, ay, aw, ah) = area;
    let mut right: Option<i64> = None;
    for (v, label) in x.step_ticks() {
        let xx = px(area, x, v);
        c.line(xx, ay, xx, ay + ah - 1, GRID);
        c.line(xx, ay + ah + 1, xx, ay + ah + 4, BLACK);
        let w = Canvas::text_width(&label, 1);
        let lx = (xx - w / 2).clamp(ax - 8, ax + aw + 8 - w);
        if right.is_none_or(|r| lx > r + 8) {
            c.text(lx, ay + ah + 6, &label, 1, BLACK);
            right = Some(lx + w);
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Scale {
    Linear,
    Log,
    /// Log when the positive values span more than a decade.
    Auto,
}

/// A value axis; for a log axis `lo`/`hi` are decimal logarithms.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Axis {
    lo: f64,
    hi: f64,
    log: bool,
}

impl Axis {
    fn linear(min: f64, max: f64, pad: f64) -> Axis {
        let (mut lo, mut hi) = (min, max);
        let scale = lo.abs().max(hi.abs());
        if hi - lo <= scale * 1e-9 {
            let d = if scale > 0.0 { scale * 0.05 } else { 0.5 };
            (lo, hi) = (lo - d, hi + d);
        }
        let p = (hi - lo) * pad;
        Axis {
            lo: lo - p,
            hi: hi + p,
            log: false,
        }
    }

    fn log(min: f64, max: f64, pad: f64) -> Axis {
        let (mut lo, mut hi) = (min.log10(), max.log10());
        if hi - lo < 1e-9 {
            (lo, hi) = (lo - 0.1, hi + 0.1);
        }
        let p = (hi - lo) * pad;
        Axis {
            lo: lo - p,
            hi: hi + p,
            log: true,
        }
    }

    /// An axis over the finite `values` (a log axis over the positive ones); `None` if there
    /// are none to show.
    fn fit(values: impl Iterator<Item = f64>, scale: Scale, pad: f64) -> Option<Axis> {
        let (mut min, mut max) = (f64::INFINITY, f64::NEG_INFINITY);
        let (mut pmin, mut pmax) = (f64::INFINITY, f64::NEG_INFINITY);
        for v in values.filter(|v| v.is_finite()) {
            (min, max) = (min.min(v), max.max(v));
            if v > 0.0 {
                (pmin, pmax) = (pmin.min(v), pmax.max(v));
            }
        }
        let log = match scale {
            Scale::Linear => false,
            Scale::Log => true,
            Scale::Auto => pmax > 10.0 * pmin,
        };
        if log {
            (pmin <= pmax).then(|| Axis::log(pmin, pmax, pad))
        } else {
            (min <= max).then(|| Axis::linear(min, max, pad))
        }
    }

    fn auto(values: impl Iterator<Item = f64>) -> Option<Axis> {
        Axis::fit(values, Scale::Auto, 0.05)
    }

    fn frac(&self, v: f64) -> f64 {
        let t = if self.log { v.log10() } else { v };
        (t - self.lo) / (self.hi - self.lo)
    }

    fn contains(&self, v: f64) -> bool {
        (0.0..=1.0).contains(&self.frac(v))
    }

    /// Tick values with labels: 1-2-5 steps on a linear axis; decades on a log axis (1-2-5 or
    /// 1…9 mantissas when it spans less, linear steps when even those are too few).
    fn ticks(&self) -> Vec<(f64, String)> {
        if !self.log {
            let step = nice_step(self.hi - self.lo, 5.0);
            return linear_ticks(self.lo, self.hi, step)
                .into_iter()
                .map(|v| (v, fmt_num(v, step)))
                .collect();
        }
        // The sparsest mantissa set giving 3 to 7 ticks, else the sparsest giving at least 2.
        let mut out: Vec<f64> = Vec::new();
        for mantissas in [
            &[1.0][..],
            &[1.0, 2.0, 5.0],
            &[1., 2., 3., 4., 5., 6., 7., 8., 9.],
        ] {
            let mut t = Vec::new();
            for e in self.lo.floor() as i32..=self.hi.ceil() as i32 {
                for m in mantissas {
                    // Parsed, so that 1e-3 is the double nearest 0.001 (not 1 / 10³).
                    let v: f64 = format!("{m}e{e}").parse().unwrap_or(f64::NAN);
                    if (self.lo - 1e-9..=self.hi + 1e-9).contains(&v.log10()) {
                        t.push(v);
                    }
                }
            }
            let n = t.len();
            if (3..=7).contains(&n) || (n >= 2 && out.len() < 2) {
                out = t;
            }
            if (3..=7).contains(&n) || n > 7 {
                break;
            }
        }
        if out.len() < 2 {
            let (a, b) = (10f64.powf(self.lo), 10f64.powf(self.hi));
            let step = nice_step(b - a, 4.0);
            return linear_ticks(a, b, step)
                .into_iter()
                .filter(|v| *v > 0.0)
                .map(|v| (v, fmt_num(v, step)))
                .collect();
        }
        let stride = out.len().div_ceil(7);
        out.into_iter()
            .step_by(stride)
            .map(|v| (v, fmt_num(v, v)))
            .collect()
    }

    /// Ticks of the step axis: whole steps, labelled `12k` / `1.5M` when large.
    fn step_ticks(&self) -> Vec<(f64, String)> {
        let step = nice_step(self.hi - self.lo, 8.0).max(1.0);
        linear_ticks(self.lo, self.hi, step)
            .into_iter()
            .map(|v| (v, fmt_step(v, step, self.hi)))
            .collect()
    }
}

/// The 1-2-5 step giving about `n` intervals over `span`.
fn nice_step(span: f64, n: f64) -> f64 {
    let raw = (span / n).max(f64::MIN_POSITIVE);
    let mag = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw * (1.0 - 1e-9))
        .unwrap_or(10.0 * mag)
}

fn linear_ticks(lo: f64, hi: f64, step: f64) -> Vec<f64> {
    let (a, b) = ((lo / step - 1e-9).ceil(), (hi / step + 1e-9).floor());
    if !(a.is_finite() && b.is_finite()) || b - a > 100.0 {
        return Vec::new();
    }
    (a as i64..=b as i64).map(|k| k as f64 * step).collect()
}

/// `v` with as many decimals as `step` needs; scientific (`1.5E-4`) when tiny or huge.
fn fmt_num(v: f64, step: f64) -> String {
    let a = v.abs();
    if a < step.abs() * 1e-6 || a == 0.0 {
        return "0".into();
    }
    let exp10 = |x: f64| (x.log10() + 1e-9).floor() as i32;
    if !(1e-3..1e5).contains(&a) {
        let mut e = exp10(a);
        let digits = (e - exp10(step.abs())).clamp(0, 3) as usize;
        let mut m = v / 10f64.powi(e);
        if format!("{:.digits$}", m.abs()).starts_with("10") {
            m /= 10.0;
            e += 1;
        }
        return format!("{m:.digits$}e{e}");
    }
    let d = (-exp10(step.abs())).clamp(0, 6) as usize;
    format!("{v:.d$}")
}

/// A step tick label; all ticks of an axis reaching `max` use the same unit.
fn fmt_step(v: f64, step: f64, max: f64) -> String {
    let unit = |div: f64, suffix: &str| {
        let d = if (step / div).fract() == 0.0 { 0 } else { 1 };
        format!("{:.d$}{suffix}", v / div)
    };
    if v == 0.0 {
        "0".into()
    } else if max >= 1e6 && step >= 1e5 {
        unit(1e6, "M")
    } else if max >= 1e4 && step >= 1e3 {
        unit(1e3, "k")
    } else {
        format!("{v:.0}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step_line(step: u64, loss: f64) -> String {
        format!(
            r#"{{"event":"step","step":{step},"epoch":0.1,"loss":{loss},"mse":{},"vb":{},"flops_loss":0.0004,"ratio":0.7,"target":0.7,"grad_norm":1.5,"skipped":0,"lr":0.0001,"steps_per_s":1.9,"elapsed_s":10.0}}"#,
            loss * 0.8,
            loss * 0.2
        )
    }

    /// A DyDiT run of `n` logged intervals: loss decays over two decades, ratio tracks a
    /// falling target, two intervals skip a step.
    fn dydit_log(n: u64) -> String {
        let mut s = String::from("{\"event\":\"start\",\"config\":{\"model\":\"DiT-S/2\"}}\n");
        for i in 0..n {
            let step = (i + 1) * 100;
            let f = i as f64 / n as f64;
            let loss = 0.5 * (-5.0 * f).exp() * (1.0 + 0.1 * (i as f64).sin());
            let target = 1.0 - 0.3 * f.min(0.5) * 2.0;
            s += &format!(
                "{{\"event\":\"step\",\"step\":{step},\"loss\":{loss},\"mse\":{},\"vb\":{},\"ratio\":{},\"target\":{target},\"grad_norm\":{},\"skipped\":{}}}\n",
                loss * 0.9,
                loss * 0.1,
                target + 0.02 * (i as f64).cos(),
                2.0 + (i as f64 * 0.3).sin(),
                if i == n / 3 || i == n / 2 { 1 } else { 0 }
            );
            if i == n / 4 {
                s += &format!("{{\"event\":\"checkpoint\",\"step\":{step},\"path\":\"ck/{step}.safetensors\"}}\n");
            }
        }
        s
    }

    #[test]
    fn parses_step_lines_and_ignores_other_events() {
        let text = format!(
            "{{\"event\":\"start\",\"config\":{{\"model\":\"DiT-S/2\"}}}}\n\n{}\n{{\"event\":\"eval\",\"fid\":30.1}}\n  \n{}\r\n{{\"event\":\"checkpoint\",\"path\":\"a.safetensors\",\"step\":200}}\n",
            step_line(100, 0.25),
            step_line(200, 0.2)
        );
        let log = parse_log(&text).unwrap();
        assert_eq!(log.steps.len(), 2);
        let r = &log.steps[0];
        assert_eq!(r.step, 100);
        assert_eq!(r.loss, Some(0.25));
        assert_eq!(r.mse, Some(0.2));
        assert_eq!(r.ratio, Some(0.7));
        assert_eq!(r.target, Some(0.7));
        assert_eq!(r.grad_norm, Some(1.5));
        assert_eq!(r.lr, Some(0.0001));
        assert_eq!(r.skipped, 0);
        assert_eq!(log.other_events, 2);
        assert_eq!(log.partial_lines, 0);
        assert_eq!(
            log.checkpoints,
            vec![Checkpoint {
                step: Some(200),
                path: Some("a.safetensors".into())
            }]
        );
        assert_eq!(log.start_str("model"), Some("DiT-S/2"));
        assert_eq!((log.first_step(), log.last_step()), (Some(100), Some(200)));
    }

    #[test]
    fn missing_keys_are_none_and_lines_without_event_are_steps() {
        // DiT from scratch: no ratio/target/flops_loss; one line without "event"; nulls and a
        // "NaN" string; an integral float step.
        let text = "{\"step\":10,\"loss\":0.9}\n\
                    {\"event\":\"step\",\"step\":20.0,\"loss\":null,\"grad_norm\":\"NaN\",\"skipped\":2}\n\
                    {\"note\":\"no step here\"}\n";
        let log = parse_log(text).unwrap();
        assert_eq!(log.steps.len(), 2);
        assert_eq!(log.steps[0].loss, Some(0.9));
        assert_eq!(log.steps[0].ratio, None);
        assert_eq!(log.steps[0].mse, None);
        assert_eq!(log.steps[0].flops_loss, None);
        assert_eq!(log.steps[1].step, 20);
        assert_eq!(log.steps[1].loss, None);
        assert!(log.steps[1].grad_norm.unwrap().is_nan());
        assert_eq!(log.steps[1].skipped, 2);
        assert_eq!(log.other_events, 1);
        assert_eq!(log.last(|r| r.loss), Some((10, 0.9)));
        assert_eq!(log.last(|r| r.ratio), None);
        assert_eq!(log.skipped_total(), 2);
        assert_eq!(panels(&log), vec![Panel::Loss, Panel::GradNorm]);
    }

    #[test]
    fn resume_later_lines_win_and_abandoned_steps_drop() {
        // Killed after logging 100..=500 with a checkpoint at 200; resumed from 200.
        let mut text = String::new();
        for s in [100, 200, 300, 400, 500] {
            text += &step_line(s, 1.0);
            text.push('\n');
        }
        text += "{\"event\":\"resume\",\"step\":200,\"path\":\"ck/200.safetensors\"}\n";
        text += &(step_line(300, 0.5) + "\n");
        let log = parse_log(&text).unwrap();
        let steps: Vec<u64> = log.steps.iter().map(|r| r.step).collect();
        assert_eq!(steps, vec![100, 200, 300]);
        assert_eq!(log.steps[2].loss, Some(0.5));
        assert_eq!((log.resumes, log.abandoned), (1, 3));

        // A resume line without a step: only repeated steps are replaced, the last one wins.
        let mut text = String::new();
        for (s, l) in [(100, 1.0), (200, 1.0), (300, 1.0)] {
            text += &(step_line(s, l) + "\n");
        }
        text += "{\"event\":\"resume\"}\n";
        for (s, l) in [(200, 0.4), (300, 0.3), (250, 0.35)] {
            text += &(step_line(s, l) + "\n");
        }
        let log = parse_log(&text).unwrap();
        let got: Vec<(u64, Option<f64>)> = log.steps.iter().map(|r| (r.step, r.loss)).collect();
        assert_eq!(
            got,
            vec![
                (100, Some(1.0)),
                (200, Some(0.4)),
                (250, Some(0.35)),
                (300, Some(0.3))
            ]
        );
        assert_eq!((log.overwritten, log.abandoned), (2, 0));
        assert_eq!(log.min_loss(), Some((300, 0.3)));
    }

    #[test]
    fn partial_last_line_is_skipped_not_an_error() {
        let full = format!("{}\n{}\n", step_line(100, 0.3), step_line(200, 0.2));
        // Cut at every byte inside the last line: never an error, always one partial line.
        let second = full.find('\n').unwrap() + 1;
        for cut in second + 1..full.len() - 1 {
            let log = parse_log(&full[..cut])
                .unwrap_or_else(|e| panic!("cut at {cut}: {e}\n{}", &full[..cut]));
            assert_eq!(log.steps.len(), 1, "cut at {cut}");
            assert_eq!(log.partial_lines, 1, "cut at {cut}");
        }
        // Complete last line without its newline: kept.
        let log = parse_log(full.trim_end()).unwrap();
        assert_eq!((log.steps.len(), log.partial_lines), (2, 0));
        // Trailing blank lines after a cut-off object (newline written, object not closed).
        let log = parse_log(&format!("{}\n{{\"step\":3,\"lo\n\n", step_line(1, 0.1))).unwrap();
        assert_eq!((log.steps.len(), log.partial_lines), (1, 1));
    }

    #[test]
    fn cut_off_line_with_a_resumed_run_appended_is_recovered() {
        // Killed while writing step 300; the resumed run appended its `resume` line right after.
        let text = format!(
            "{}\n{}\n{{\"event\":\"step\",\"step\":300,\"lo{{\"event\":\"resume\",\"step\":200,\"from\":\"ck/200\"}}\n{}\n",
            step_line(100, 0.3),
            step_line(200, 0.2),
            step_line(300, 0.1)
        );
        let log = parse_log(&text).unwrap();
        assert_eq!((log.partial_lines, log.resumes), (1, 1));
        let got: Vec<(u64, Option<f64>)> = log.steps.iter().map(|r| (r.step, r.loss)).collect();
        assert_eq!(
            got,
            vec![(100, Some(0.3)), (200, Some(0.2)), (300, Some(0.1))]
        );
        // Two complete objects on one line are not a cut-off line: an error.
        let e = parse_log("{\"step\":1}{\"step\":2}\n")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("line 1"), "{e}");
    }

    #[test]
    fn malformed_lines_name_their_line_number() {
        let err = |t: &str| parse_log(t).unwrap_err().to_string();
        let e = err(&format!(
            "{}\n\n{{\"step\":2,\"loss\":}}\n{}\n",
            step_line(1, 0.1),
            step_line(3, 0.1)
        ));
        assert!(e.starts_with("line 3, column"), "{e}");
        assert!(!e.contains("at line 1"), "{e}");
        // Mid-file cut-off object (a later line follows): an error, not a partial line.
        let e = err(&format!("{{\"step\":2,\"lo\n{}\n", step_line(3, 0.1)));
        assert!(e.starts_with("line 1"), "{e}");
        // Last line complete but invalid (trailing garbage).
        let e = err(&format!("{}\n{{\"step\":2}} x\n", step_line(1, 0.1)));
        assert!(e.starts_with("line 2"), "{e}");
        let e = err("[1, 2]\n");
        assert!(e.contains("line 1") && e.contains("JSON object"), "{e}");
        let e = err("{\"event\":\"step\",\"loss\":0.1}\n");
        assert!(e.contains("line 1") && e.contains("\"step\""), "{e}");
        let e = err("{\"event\":\"step\",\"step\":-5}\n");
        assert!(e.contains("line 1") && e.contains("-5"), "{e}");
        let e = err("{\"event\":3,\"step\":5}\n");
        assert!(e.contains("line 1") && e.contains("event"), "{e}");
        // Blank and empty logs parse to no records.
        assert!(parse_log("").unwrap().steps.is_empty());
        assert!(parse_log("\n  \n").unwrap().steps.is_empty());
    }

    fn count(img: &RgbImage, area: Area, col: Rgb<u8>) -> usize {
        let (ax, ay, aw, ah) = area;
        (ay..ay + ah)
            .flat_map(|y| (ax..ax + aw).map(move |x| (x, y)))
            .filter(|&(x, y)| *img.get_pixel(x as u32, y as u32) == col)
            .count()
    }

    fn non_background(img: &RgbImage, area: Area) -> usize {
        let (ax, ay, aw, ah) = area;
        (ay..ay + ah)
            .flat_map(|y| (ax..ax + aw).map(move |x| (x, y)))
            .filter(|&(x, y)| {
                let p = *img.get_pixel(x as u32, y as u32);
                p != crate::viz::canvas::WHITE && p != GRID
            })
            .count()
    }

    #[test]
    fn a_log_without_a_vb_term_draws_no_vb_curve() {
        let text: String = (1..=50)
            .map(|i| {
                step_line(i * 10, 1.0 / i as f64).replace("\"vb\":", "\"vb\":0.0,\"x\":") + "\n"
            })
            .collect();
        let log = parse_log(&text).unwrap();
        assert!(log.steps.iter().all(|r| r.vb == Some(0.0)));
        let img = training_curves(&log, "SiT");
        let a = plot_area(0);
        assert!(count(&img, a, MSE) > 100);
        assert_eq!(count(&img, a, VB), 0);
    }

    #[test]
    fn dydit_log_gets_three_panels_with_data_in_each() {
        let log = parse_log(&dydit_log(400)).unwrap();
        assert_eq!(
            panels(&log),
            vec![Panel::Loss, Panel::Ratio, Panel::GradNorm]
        );
        let img = training_curves(&log, "DyDiT-S/2 test run");
        assert_eq!(img.dimensions(), (WIDTH, image_height(3)));
        assert_eq!(image_height(3), (TOP + 3 * 248 + BOTTOM) as u32);
        let [a, b, g] = [plot_area(0), plot_area(1), plot_area(2)];
        // Loss: smoothed loss (400 points → mean of 8), raw loss, MSE and VB all drawn.
        assert!(count(&img, a, LOSS) > 300, "moving average");
        assert!(count(&img, a, lighten(LOSS, 0.6)) > 100, "raw loss");
        assert!(count(&img, a, MSE) > 100);
        assert!(count(&img, a, VB) > 100);
        assert!(count(&img, a, CKPT) > 0, "checkpoint marker");
        // Ratio and the dashed target.
        assert!(count(&img, b, RATIO) > 300);
        let target = count(&img, b, TARGET);
        assert!(target > 100, "target drawn");
        // Grad norm and the two skipped intervals.
        assert!(count(&img, g, GRAD) > 300);
        assert!(count(&img, g, SKIP) >= 2 * 15, "skip markers");
        assert!(count(&img, g, SKIP_BAND) > 2 * 100, "skip bands");
        assert!(non_background(&img, (LEFT, 8, 200, 14)) > 50, "title");
        // Tick labels: value labels left of every plot, step labels under it.
        for i in 0..3 {
            let (ax, ay, aw, ah) = plot_area(i);
            assert!(
                non_background(&img, (0, ay, ax - 6, ah)) > 15,
                "y labels {i}"
            );
            assert!(
                non_background(&img, (ax, ay + ah + 6, aw, 7)) > 30,
                "x labels {i}"
            );
        }
        // Loss spans two decades: log scale.
        let loss = series(&log, |r| r.loss);
        assert!(Axis::auto(loss.iter().map(|p| p.1)).unwrap().log);
    }

    #[test]
    fn dit_log_without_ratio_gets_two_panels() {
        let mut text = String::new();
        for i in 0..30u64 {
            text += &format!(
                "{{\"event\":\"step\",\"step\":{},\"loss\":{},\"grad_norm\":{}}}\n",
                i * 50,
                0.2 + 0.01 * (i % 3) as f64,
                1.0 + i as f64 * 0.01
            );
        }
        let log = parse_log(&text).unwrap();
        assert_eq!(panels(&log), vec![Panel::Loss, Panel::GradNorm]);
        let img = training_curves(&log, "DiT");
        assert_eq!(img.dimensions(), (WIDTH, image_height(2)));
        // 30 points: no moving average, the raw loss in full colour; linear y (no decade).
        assert!(count(&img, plot_area(0), LOSS) > 100);
        assert_eq!(count(&img, plot_area(0), lighten(LOSS, 0.6)), 0);
        assert!(count(&img, plot_area(1), GRAD) > 100);
        let loss = series(&log, |r| r.loss);
        assert!(!Axis::auto(loss.iter().map(|p| p.1)).unwrap().log);
    }

    #[test]
    fn degenerate_logs_do_not_panic() {
        for text in [
            "",
            "{\"step\":5}\n",
            "{\"step\":5,\"loss\":0.1,\"ratio\":0.5,\"grad_norm\":0}\n",
            "{\"step\":5,\"loss\":-1,\"skipped\":1}\n{\"step\":5000000,\"loss\":1e-9}\n",
            "{\"step\":0,\"loss\":1e300,\"target\":0.5}\n{\"step\":1,\"loss\":1e-300}\n",
        ] {
            let log = parse_log(text).unwrap();
            let img = training_curves(&log, &"long title ".repeat(20));
            assert_eq!(img.dimensions(), (WIDTH, image_height(panels(&log).len())));
            // Every panel has at least its frame.
            for i in 0..panels(&log).len() {
                let (ax, ay, aw, ah) = plot_area(i);
                assert_eq!(*img.get_pixel((ax - 1) as u32, (ay + ah / 2) as u32), BLACK);
                assert_eq!(
                    *img.get_pixel((ax + aw) as u32, (ay + ah / 2) as u32),
                    BLACK
                );
            }
        }
    }

    #[test]
    fn axis_ticks_and_labels() {
        let lin = Axis::linear(0.0, 1.0, 0.0);
        let t: Vec<String> = lin.ticks().into_iter().map(|t| t.1).collect();
        assert_eq!(t, ["0", "0.2", "0.4", "0.6", "0.8", "1.0"]);
        // Log axis over three decades: decade ticks.
        let log = Axis::log(1e-3, 1.0, 0.0);
        let t: Vec<String> = log.ticks().into_iter().map(|t| t.1).collect();
        assert_eq!(t, ["0.001", "0.01", "0.1", "1"]);
        // Less than a decade: 1-2-5 mantissas, else 1…9.
        let t: Vec<String> = Axis::log(0.15, 0.9, 0.0)
            .ticks()
            .into_iter()
            .map(|t| t.1)
            .collect();
        assert_eq!(t, ["0.2", "0.5"]);
        let t = Axis::log(0.31, 0.39, 0.0).ticks();
        assert!(
            t.len() >= 2 && t.iter().all(|(v, _)| (0.31..=0.39).contains(v)),
            "{t:?}"
        );
        // Huge and tiny numbers in scientific notation.
        assert_eq!(fmt_num(1e-5, 1e-5), "1e-5");
        assert_eq!(fmt_num(1.5e-4, 1e-5), "1.5e-4");
        assert_eq!(fmt_num(2e6, 1e6), "2e6");
        assert_eq!(fmt_num(0.05, 0.05), "0.05");
        // Step axis labels.
        assert_eq!(fmt_step(1200.0, 200.0, 1400.0), "1200");
        assert_eq!(fmt_step(40000.0, 10000.0, 40000.0), "40k");
        assert_eq!(fmt_step(5000.0, 5000.0, 20000.0), "5k");
        assert_eq!(fmt_step(12500.0, 2500.0, 20000.0), "12.5k");
        assert_eq!(fmt_step(1.5e6, 5e5, 2e6), "1.5M");
        // 1.5 decades: 1-2-5 ticks rather than two decades.
        let t: Vec<String> = Axis::log(0.8, 25.0, 0.0)
            .ticks()
            .into_iter()
            .map(|t| t.1)
            .collect();
        assert_eq!(t, ["1", "2", "5", "10", "20"]);
        let t = Axis::linear(100.0, 400000.0, 0.0).step_ticks();
        assert!(t.iter().all(|(v, _)| (100.0..=400000.0).contains(v)));
        assert_eq!(t.last().unwrap().1, "400k");
        // Auto scale: log only past a decade.
        assert!(Axis::auto([0.01, 0.5].into_iter()).unwrap().log);
        assert!(!Axis::auto([0.1, 0.5].into_iter()).unwrap().log);
        assert!(Axis::auto(std::iter::empty()).is_none());
    }

    #[test]
    fn moving_average_is_centred() {
        let v = [1.0, 2.0, 3.0, 4.0, 5.0];
        assert_eq!(moving_average(&v, 1), v.to_vec());
        assert_eq!(moving_average(&v, 3), vec![1.5, 2.0, 3.0, 4.0, 4.5]);
    }

    #[test]
    fn dashed_polyline_has_gaps_across_short_segments() {
        let mut c = Canvas::new(60, 3);
        // 59 one-pixel segments: a plain per-segment dash would draw them all.
        let pts: Vec<(i64, i64)> = (0..60).map(|x| (x, 1)).collect();
        c.dashed_polyline(&pts, BLACK, 6, 4);
        let drawn: Vec<bool> = (0..60).map(|x| *c.img.get_pixel(x, 1) == BLACK).collect();
        assert_eq!(drawn.iter().filter(|d| **d).count(), 36);
        assert!(drawn[..6].iter().all(|d| *d) && drawn[6..10].iter().all(|d| !*d));
    }
}
