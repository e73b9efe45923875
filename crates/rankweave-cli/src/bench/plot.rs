//! A small hand-written SVG: bus bandwidth and latency against size, log
//! axes, one line per series (implementation / transport, operation, mode,
//! world size), a legend. Enough to see where two transports cross.

use super::report::Record;
use std::collections::BTreeSet;
use std::fmt::Write as _;

/// One line on both panels.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// Legend text.
    pub label: String,
    /// `(bytes, busbw GB/s, median µs)`, sorted by bytes.
    pub points: Vec<(f64, f64, f64)>,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Key {
    impl_name: String,
    op: String,
    mode: String,
    world: usize,
    source: String,
}

/// Groups records into series. `records` pairs each record with its source
/// (a file name, or `""` for this run); the source only splits a series when
/// two sources hold the same (impl, op, mode, world size).
pub fn series(records: &[(String, Record)]) -> Vec<Series> {
    let base = |r: &Record| (r.impl_name.clone(), r.op.clone(), r.mode.clone(), r.world_size);
    let mut sources_of: std::collections::BTreeMap<(String, String, String, usize), BTreeSet<String>> =
        Default::default();
    for (src, r) in records {
        sources_of.entry(base(r)).or_default().insert(src.clone());
    }
    let mut groups: std::collections::BTreeMap<Key, Vec<(f64, f64, f64)>> = Default::default();
    let mut order: Vec<Key> = Vec::new();
    for (src, r) in records {
        let b = base(r);
        let split = sources_of.get(&b).is_some_and(|s| s.len() > 1);
        let key = Key {
            impl_name: b.0,
            op: b.1,
            mode: b.2,
            world: b.3,
            source: if split { src.clone() } else { String::new() },
        };
        if !groups.contains_key(&key) {
            order.push(key.clone());
        }
        groups.entry(key).or_default().push((r.bytes as f64, r.busbw_gbps, r.median_us));
    }
    let varies = |f: &dyn Fn(&Key) -> String| order.iter().map(f).collect::<BTreeSet<_>>().len() > 1;
    let (v_op, v_mode, v_world) =
        (varies(&|k| k.op.clone()), varies(&|k| k.mode.clone()), varies(&|k| k.world.to_string()));
    order
        .into_iter()
        .map(|k| {
            let mut label = k.impl_name.clone();
            if !k.source.is_empty() {
                let _ = write!(label, " ({})", k.source);
            }
            if v_op {
                let _ = write!(label, " {}", k.op);
            }
            if v_mode {
                let _ = write!(label, " {}", k.mode);
            }
            if v_world {
                let _ = write!(label, " N={}", k.world);
            }
            let mut points = groups.remove(&k).unwrap_or_default();
            points.sort_by(|a, b| a.0.total_cmp(&b.0));
            points.dedup_by(|a, b| a.0 == b.0);
            Series { label, points }
        })
        .collect()
}

const PALETTE: [&str; 10] =
    ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#7f7f7f", "#bcbd22"];
const DASHES: [&str; 3] = ["", "6,3", "2,2"];

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// A log axis over `[lo, hi]` (both positive), widened to whole steps of `base`.
#[derive(Debug, Clone, Copy)]
struct LogAxis {
    lo: f64,
    hi: f64,
}

impl LogAxis {
    fn new(vals: impl Iterator<Item = f64>, base: f64) -> Option<LogAxis> {
        let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
        for v in vals.filter(|v| *v > 0.0 && v.is_finite()) {
            lo = lo.min(v);
            hi = hi.max(v);
        }
        if !lo.is_finite() {
            return None;
        }
        let lo = base.powf(lo.log(base).floor());
        let mut hi = base.powf(hi.log(base).ceil());
        if hi <= lo {
            hi = lo * base;
        }
        Some(LogAxis { lo, hi })
    }
    /// 0..1 position of `v`.
    fn frac(&self, v: f64) -> f64 {
        (v.ln() - self.lo.ln()) / (self.hi.ln() - self.lo.ln())
    }
    fn ticks(&self, base: f64) -> Vec<f64> {
        let mut t = Vec::new();
        let mut v = self.lo;
        while v <= self.hi * 1.000_001 {
            t.push(v);
            v *= base;
        }
        t
    }
}

fn size_label(b: f64) -> String {
    let b = b.round() as u64;
    for (unit, div) in [("G", 1u64 << 30), ("M", 1 << 20), ("K", 1 << 10)] {
        if b >= div && b % div == 0 {
            return format!("{}{unit}", b / div);
        }
    }
    format!("{b}")
}

fn decade_label(v: f64) -> String {
    let k = v.log10().round() as i32;
    match k {
        0..=6 => format!("{}", 10f64.powi(k) as u64),
        -4..=-1 => format!("{}", 10f64.powi(k)),
        _ => format!("1e{k}"),
    }
}

struct Panel<'a> {
    x0: f64,
    y0: f64,
    w: f64,
    h: f64,
    title: &'a str,
    ylabel: &'a str,
}

fn draw_panel(
    s: &mut String,
    p: &Panel<'_>,
    xs: LogAxis,
    ys: Option<LogAxis>,
    series: &[Series],
    pick: fn(&(f64, f64, f64)) -> f64,
) {
    let _ = writeln!(
        s,
        r##"<rect x="{:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="none" stroke="#444"/>"##,
        p.x0, p.y0, p.w, p.h
    );
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="14" font-weight="bold">{}</text>"#,
        p.x0 + p.w / 2.0,
        p.y0 - 10.0,
        esc(p.title)
    );
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="12">size (bytes, log scale)</text>"#,
        p.x0 + p.w / 2.0,
        p.y0 + p.h + 36.0
    );
    let (ly_x, ly_y) = (p.x0 - 52.0, p.y0 + p.h / 2.0);
    let _ = writeln!(
        s,
        r#"<text x="{ly_x:.1}" y="{ly_y:.1}" text-anchor="middle" font-size="12" transform="rotate(-90 {ly_x:.1} {ly_y:.1})">{}</text>"#,
        esc(p.ylabel)
    );
    let xpos = |v: f64| p.x0 + xs.frac(v) * p.w;
    let step = if xs.ticks(4.0).len() > 12 { 16.0 } else { 4.0 };
    for t in xs.ticks(step) {
        let x = xpos(t);
        let _ = writeln!(
            s,
            r##"<line x1="{x:.1}" y1="{:.1}" x2="{x:.1}" y2="{:.1}" stroke="#ddd"/><text x="{x:.1}" y="{:.1}" text-anchor="middle" font-size="10">{}</text>"##,
            p.y0,
            p.y0 + p.h,
            p.y0 + p.h + 14.0,
            size_label(t)
        );
    }
    let Some(ys) = ys else {
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="12">no positive values</text>"#,
            p.x0 + p.w / 2.0,
            p.y0 + p.h / 2.0
        );
        return;
    };
    let ypos = |v: f64| p.y0 + p.h - ys.frac(v) * p.h;
    for t in ys.ticks(10.0) {
        let y = ypos(t);
        let _ = writeln!(
            s,
            r##"<line x1="{:.1}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end" font-size="10">{}</text>"##,
            p.x0,
            p.x0 + p.w,
            p.x0 - 4.0,
            y + 3.0,
            decade_label(t)
        );
    }
    for (i, se) in series.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        let dash = DASHES[(i / PALETTE.len()) % DASHES.len()];
        let pts: Vec<(f64, f64)> = se
            .points
            .iter()
            .filter(|pt| pick(pt) > 0.0 && pick(pt).is_finite())
            .map(|pt| (xpos(pt.0), ypos(pick(pt))))
            .collect();
        let coords: Vec<String> = pts.iter().map(|(x, y)| format!("{x:.1},{y:.1}")).collect();
        let dash_attr = if dash.is_empty() { String::new() } else { format!(r#" stroke-dasharray="{dash}""#) };
        let _ = writeln!(
            s,
            r#"<polyline fill="none" stroke="{color}" stroke-width="1.8"{dash_attr} points="{}"><title>{}</title></polyline>"#,
            coords.join(" "),
            esc(&se.label)
        );
        for (x, y) in pts {
            let _ = writeln!(s, r#"<circle cx="{x:.1}" cy="{y:.1}" r="2.5" fill="{color}"/>"#);
        }
    }
}

/// The SVG document for `series` under `title`.
pub fn render_svg(title: &str, series: &[Series]) -> String {
    let (pw, ph) = (440.0, 300.0);
    let (left, top, gap) = (80.0, 70.0, 110.0);
    let legend_rows = series.len().div_ceil(2);
    let width = left + pw + gap + pw + 40.0;
    let height = top + ph + 60.0 + 18.0 * legend_rows as f64 + 20.0;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0}" height="{height:.0}" viewBox="0 0 {width:.0} {height:.0}" font-family="sans-serif">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ =
        writeln!(s, r#"<text x="{:.1}" y="26" text-anchor="middle" font-size="16">{}</text>"#, width / 2.0, esc(title));
    let all = || series.iter().flat_map(|se| se.points.iter());
    let Some(xs) = LogAxis::new(all().map(|p| p.0), 4.0) else {
        let _ = writeln!(s, r#"<text x="40" y="80" font-size="14">no data</text>"#);
        s.push_str("</svg>\n");
        return s;
    };
    let bw = LogAxis::new(all().map(|p| p.1), 10.0);
    let lat = LogAxis::new(all().map(|p| p.2), 10.0);
    let p1 = Panel { x0: left, y0: top, w: pw, h: ph, title: "bus bandwidth", ylabel: "busbw (GB/s, log scale)" };
    let p2 = Panel {
        x0: left + pw + gap,
        y0: top,
        w: pw,
        h: ph,
        title: "latency (median per op)",
        ylabel: "time (us, log scale)",
    };
    draw_panel(&mut s, &p1, xs, bw, series, |p| p.1);
    draw_panel(&mut s, &p2, xs, lat, series, |p| p.2);
    let ly = top + ph + 60.0;
    for (i, se) in series.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        let dash = DASHES[(i / PALETTE.len()) % DASHES.len()];
        let x = left + (i % 2) as f64 * (pw + gap);
        let y = ly + (i / 2) as f64 * 18.0;
        let dash_attr = if dash.is_empty() { String::new() } else { format!(r#" stroke-dasharray="{dash}""#) };
        let _ = writeln!(
            s,
            r#"<line x1="{x:.1}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="{color}" stroke-width="2.5"{dash_attr}/><text x="{:.1}" y="{:.1}" font-size="12">{}</text>"#,
            x + 24.0,
            x + 30.0,
            y + 4.0,
            esc(&se.label)
        );
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(imp: &str, op: &str, bytes: u64, busbw: f64, us: f64) -> Record {
        Record {
            impl_name: imp.into(),
            op: op.into(),
            mode: "loop".into(),
            world_size: 2,
            bytes,
            median_us: us,
            busbw_gbps: busbw,
            ..Default::default()
        }
    }

    #[test]
    fn one_series_per_impl_and_labels_show_what_varies() {
        let recs: Vec<(String, Record)> = vec![
            ("a".into(), rec("rankweave-tcp", "all_reduce", 1024, 0.1, 10.0)),
            ("a".into(), rec("rankweave-tcp", "all_reduce", 8, 0.0, 5.0)),
            ("b".into(), rec("openmpi-shm", "all_reduce", 8, 0.02, 0.3)),
        ];
        let s = series(&recs);
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].label, "rankweave-tcp");
        assert_eq!(s[0].points[0].0, 8.0, "sorted by size");
        let recs2: Vec<(String, Record)> = vec![
            ("run1".into(), rec("rankweave-tcp", "all_reduce", 8, 0.1, 1.0)),
            ("run2".into(), rec("rankweave-tcp", "all_reduce", 8, 0.1, 1.0)),
            ("run2".into(), rec("rankweave-tcp", "broadcast", 8, 0.1, 1.0)),
        ];
        let labels: Vec<String> = series(&recs2).into_iter().map(|s| s.label).collect();
        assert_eq!(
            labels,
            vec!["rankweave-tcp (run1) all_reduce", "rankweave-tcp (run2) all_reduce", "rankweave-tcp broadcast"]
        );
    }

    #[test]
    fn svg_is_well_formed_with_a_polyline_per_series_per_panel() {
        let recs: Vec<(String, Record)> = vec![
            ("".into(), rec("rankweave-tcp", "all_reduce", 8, 0.001, 5.0)),
            ("".into(), rec("rankweave-tcp", "all_reduce", 1 << 20, 2.0, 400.0)),
            ("".into(), rec("rankweave-shm", "all_reduce", 8, 0.02, 0.4)),
            ("".into(), rec("rankweave-shm", "all_reduce", 1 << 20, 7.0, 150.0)),
            ("".into(), rec("a<b&c", "all_reduce", 1 << 20, 7.0, 150.0)),
        ];
        let svg = render_svg("all_reduce <N=2>", &series(&recs));
        assert!(svg.starts_with("<svg"));
        assert!(svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 6);
        assert!(svg.contains("a&lt;b&amp;c"));
        assert!(svg.contains("all_reduce &lt;N=2&gt;"));
        assert!(svg.contains(">1M<"), "size ticks");
        assert!(svg.contains("busbw (GB/s"));
        // every opened element is closed or self-closed
        assert_eq!(svg.matches("<text").count(), svg.matches("</text>").count());
        assert_eq!(svg.matches("<polyline").count(), svg.matches("</polyline>").count());
        let empty = render_svg("nothing", &[]);
        assert!(empty.starts_with("<svg") && empty.contains("no data"));
    }

    #[test]
    fn log_axes_cover_the_data() {
        let a = LogAxis::new([3.0, 900.0].into_iter(), 10.0).unwrap();
        assert_eq!((a.lo, a.hi), (1.0, 1000.0));
        assert!((a.frac(10.0) - 1.0 / 3.0).abs() < 1e-12);
        assert_eq!(a.ticks(10.0), vec![1.0, 10.0, 100.0, 1000.0]);
        assert!(LogAxis::new([0.0, -1.0].into_iter(), 10.0).is_none());
        assert_eq!(decade_label(0.001), "0.001");
        assert_eq!(decade_label(1e6), "1000000");
        assert_eq!(decade_label(1e-6), "1e-6");
        assert_eq!(size_label(8.0), "8");
        assert_eq!(size_label(1048576.0), "1M");
    }
}
