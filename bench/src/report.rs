//! Every run ends with an aligned table for people and exactly one JSON line
//! (starting with `{`) for scripts. Keys keep their insertion order.

use hdrhistogram::Histogram;
use serde_json::Value;

/// An ordered JSON object.
#[derive(Debug, Default, Clone)]
pub struct Obj(pub Vec<(String, Value)>);

impl Obj {
    pub fn put(&mut self, key: &str, value: impl Into<Value>) {
        self.0.push((key.to_string(), value.into()));
    }

    pub fn to_json(&self) -> String {
        let mut out = String::from("{");
        for (i, (k, v)) in self.0.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(&Value::String(k.clone()).to_string());
            out.push(':');
            out.push_str(&v.to_string());
        }
        out.push('}');
        out
    }
}

pub struct Report {
    pub workload: String,
    pub url: String,
    pub params: Obj,
    /// (section, label, shown value)
    rows: Vec<(String, String, String)>,
    pub figures: Obj,
    /// Nested objects printed in order (latency etc.).
    nested: Vec<(String, Obj)>,
    pub server: Obj,
    pub client: Obj,
    pub warnings: Vec<String>,
    /// Names of the headline figures, for compare.sh.
    pub key: Vec<String>,
    pub error: Option<String>,
    section: String,
}

impl Report {
    pub fn new(workload: &str, url: &str) -> Report {
        Report {
            workload: workload.to_string(),
            url: url.to_string(),
            params: Obj::default(),
            rows: Vec::new(),
            figures: Obj::default(),
            nested: Vec::new(),
            server: Obj::default(),
            client: Obj::default(),
            warnings: Vec::new(),
            key: Vec::new(),
            error: None,
            section: String::new(),
        }
    }

    pub fn section(&mut self, name: &str) {
        self.section = name.to_string();
    }

    /// A figure: shown in the table and stored under `figures.key`.
    pub fn fig(&mut self, key: &str, label: &str, value: impl Into<Value>, shown: String) {
        self.figures.put(key, value);
        self.rows
            .push((self.section.clone(), label.to_string(), shown));
    }

    /// A headline figure (compare.sh takes medians and ratios of these).
    pub fn key_fig(&mut self, key: &str, label: &str, value: impl Into<Value>, shown: String) {
        self.key.push(key.to_string());
        self.fig(key, label, value, shown);
    }

    /// A table row without a JSON figure of its own.
    pub fn row(&mut self, label: &str, shown: String) {
        self.rows
            .push((self.section.clone(), label.to_string(), shown));
    }

    /// Latency percentiles (µs) as `figures.<key>` = {p50,…} and table rows.
    /// Flattened headline keys `<key>_p50_us` / `<key>_p99_us` are added too.
    pub fn latency(&mut self, key: &str, label: &str, h: &Histogram<u64>, headline: bool) {
        let mut o = Obj::default();
        o.put("count", h.len());
        if h.is_empty() {
            self.rows
                .push((self.section.clone(), label.to_string(), "no samples".into()));
            self.nested.push((key.to_string(), o));
            return;
        }
        let q = |p: f64| h.value_at_quantile(p);
        o.put("p50", q(0.50));
        o.put("p90", q(0.90));
        o.put("p99", q(0.99));
        o.put("p999", q(0.999));
        o.put("max", h.max());
        o.put("mean", (h.mean() * 10.0).round() / 10.0);
        self.rows.push((
            self.section.clone(),
            label.to_string(),
            format!(
                "p50 {}  p90 {}  p99 {}  p99.9 {}  max {}",
                us(q(0.50)),
                us(q(0.90)),
                us(q(0.99)),
                us(q(0.999)),
                us(h.max())
            ),
        ));
        self.nested.push((key.to_string(), o));
        let p50 = format!("{key}_p50_us");
        let p99 = format!("{key}_p99_us");
        self.figures.put(&p50, q(0.50));
        self.figures.put(&p99, q(0.99));
        self.figures.put(&format!("{key}_cdf"), cdf(h));
        if headline {
            self.key.push(p50);
            self.key.push(p99);
        }
    }

    pub fn warn(&mut self, w: impl Into<String>) {
        self.warnings.push(w.into());
    }

    pub fn json_line(&self) -> String {
        let mut top = Obj::default();
        top.put("workload", self.workload.clone());
        top.put("url", self.url.clone());
        top.put("ok", self.error.is_none());
        if let Some(e) = &self.error {
            top.put("error", e.clone());
        }
        let mut out = String::from("{");
        let mut first = true;
        let mut push = |k: &str, v: String| {
            if !first {
                out.push(',');
            }
            first = false;
            out.push_str(&Value::String(k.to_string()).to_string());
            out.push(':');
            out.push_str(&v);
        };
        for (k, v) in &top.0 {
            push(k, v.to_string());
        }
        push("params", self.params.to_json());
        let mut figs = self.figures.to_json();
        if !self.nested.is_empty() {
            figs.pop();
            for (k, o) in &self.nested {
                if figs.len() > 1 {
                    figs.push(',');
                }
                figs.push_str(&Value::String(k.clone()).to_string());
                figs.push(':');
                figs.push_str(&o.to_json());
            }
            figs.push('}');
        }
        push("figures", figs);
        push("server", self.server.to_json());
        push("client", self.client.to_json());
        push("key", Value::from(self.key.clone()).to_string());
        push("warnings", Value::from(self.warnings.clone()).to_string());
        out.push('}');
        out
    }

    pub fn table(&self) -> String {
        let width = self
            .rows
            .iter()
            .map(|(_, l, _)| l.chars().count())
            .max()
            .unwrap_or(0)
            .max(24);
        let mut out = String::new();
        let params: Vec<String> = self
            .params
            .0
            .iter()
            .map(|(k, v)| match v {
                Value::String(s) => format!("{k}={s}"),
                v => format!("{k}={v}"),
            })
            .collect();
        out.push_str(&format!(
            "== roomcast-bench {}  {}\n",
            self.workload, self.url
        ));
        out.push_str(&format!("   {}\n", params.join(" ")));
        if let Some(e) = &self.error {
            out.push_str(&format!("\nERROR: {e}\n"));
        }
        let mut section = None;
        for (s, label, shown) in &self.rows {
            if section != Some(s) {
                out.push_str(&format!("\n-- {s}\n"));
                section = Some(s);
            }
            out.push_str(&format!("  {label:<width$}  {shown}\n"));
        }
        if !self.warnings.is_empty() {
            out.push_str("\n-- warnings\n");
            for w in &self.warnings {
                out.push_str(&format!("  ! {w}\n"));
            }
        }
        out
    }

    /// Prints the table (unless `json_only`) and the JSON line.
    pub fn print(&self, json_only: bool) {
        if !json_only {
            println!("{}", self.table());
        }
        println!("{}", self.json_line());
    }
}

/// Percentiles at which `<key>_cdf` samples a latency histogram: dense in the
/// body, then every "nine" of the tail up to p99.99.
pub const CDF_PERCENTILES: [f64; 40] = [
    1.0, 2.0, 5.0, 10.0, 15.0, 20.0, 25.0, 30.0, 35.0, 40.0, 45.0, 50.0, 55.0, 60.0, 65.0, 70.0,
    75.0, 80.0, 85.0, 90.0, 92.0, 94.0, 95.0, 96.0, 97.0, 98.0, 98.5, 99.0, 99.2, 99.4, 99.5, 99.6,
    99.7, 99.8, 99.9, 99.92, 99.95, 99.97, 99.98, 99.99,
];

/// The latency CDF as `[[percentile, µs], …]` at [`CDF_PERCENTILES`]
/// (value at or below which that share of the samples fall).
pub fn cdf(h: &Histogram<u64>) -> Value {
    Value::Array(
        CDF_PERCENTILES
            .iter()
            .map(|&p| {
                Value::Array(vec![
                    Value::from(p),
                    Value::from(h.value_at_quantile(p / 100.0)),
                ])
            })
            .collect(),
    )
}

/// Microseconds for people: `850µs`, `12.3ms`, `1.20s`.
pub fn us(v: u64) -> String {
    if v < 1000 {
        format!("{v}µs")
    } else if v < 1_000_000 {
        format!("{:.1}ms", v as f64 / 1000.0)
    } else {
        format!("{:.2}s", v as f64 / 1e6)
    }
}

/// Thousands separators: `1,234,567`.
pub fn int(v: u64) -> String {
    let s = v.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A rate with separators, e.g. `123,456/s`.
pub fn rate(v: f64) -> String {
    format!("{}/s", int(v.round() as u64))
}

pub fn bytes(v: u64) -> String {
    if v < 10 * 1024 {
        format!("{v} B")
    } else if v < 10 * 1024 * 1024 {
        format!("{:.1} KiB", v as f64 / 1024.0)
    } else {
        format!("{:.1} MiB", v as f64 / 1024.0 / 1024.0)
    }
}

pub fn round(v: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (v * f).round() / f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_line_is_one_object() {
        let mut r = Report::new("fanout", "ws://127.0.0.1:1");
        r.params.put("rooms", 1);
        r.section("traffic");
        r.key_fig("published_per_s", "published/s", 10.5, rate(10.5));
        let mut h = crate::common::histogram();
        h.record(100).unwrap();
        r.latency("latency", "latency", &h, true);
        r.warn("careful");
        let line = r.json_line();
        assert!(line.starts_with('{') && !line.contains('\n'));
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["figures"]["latency"]["p50"], 100);
        assert_eq!(v["figures"]["latency_p99_us"], 100);
        let cdf = v["figures"]["latency_cdf"].as_array().unwrap();
        assert_eq!(cdf.len(), CDF_PERCENTILES.len());
        assert_eq!(cdf[0][0], 1.0);
        assert_eq!(cdf[cdf.len() - 1][0], 99.99);
        assert_eq!(cdf[0][1], 100);
        assert_eq!(v["key"][0], "published_per_s");
        assert!(r.table().contains("published/s"));
        assert_eq!(int(1234567), "1,234,567");
    }

    #[test]
    fn cdf_is_monotonic_over_a_spread() {
        let mut h = crate::common::histogram();
        for v in 1..=100_000u64 {
            h.record(v).unwrap();
        }
        let cdf = cdf(&h);
        let pts = cdf.as_array().unwrap();
        let vals: Vec<u64> = pts.iter().map(|p| p[1].as_u64().unwrap()).collect();
        assert!(vals.windows(2).all(|w| w[0] <= w[1]));
        // p50 of 1..=100000 within the histogram's 3 significant digits
        let p50 = pts.iter().find(|p| p[0] == 50.0).unwrap()[1]
            .as_u64()
            .unwrap();
        assert!((49_900..=50_100).contains(&p50), "{p50}");
    }
}
