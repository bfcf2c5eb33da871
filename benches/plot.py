#!/usr/bin/env python3
"""Plots of a benchmark campaign as hand-written SVG (Python 3 standard library only).

    benches/plot.py [--results DIR_OR_FILE ...] [--out docs/bench]

Reads the JSON lines that benches/compare.sh leaves (default: every *.jsonl of
target/bench-results/campaign-latest, the directory benches/campaign.sh fills)
and writes:

  fanout-deliveries.svg   deliveries/s against room size (fanout, --rate 0, 1 room)
  fanout-p99.svg          p99 latency against room size (same runs)
  fanout-cpu.svg          server CPU µs per delivery against room size (same runs)
  idle-rss.svg            server RSS per connection against open connections (idle)
  latency-cdf.svg         latency CDF per server (fanout 1 room × 100 members at a
                          fixed --rate, from the harness's `latency_cdf`)

Each point is the median over the runs of that server and x value; a whisker
spans the runs' minimum and maximum. For the CDF the run with the median p99 is
drawn. Runs with "ok": false are ignored.
"""

import argparse
import glob
import json
import math
import os
import statistics
import sys
from xml.sax.saxutils import escape

COLORS = {
    "roomcast": "#d62728",
    "tokio-tungstenite": "#1f77b4",
    "node-ws": "#2ca02c",
    "fastapi": "#9467bd",
}
EXTRA_COLORS = ["#ff7f0e", "#8c564b", "#e377c2", "#7f7f7f", "#17becf"]
ORDER = ["roomcast", "tokio-tungstenite", "node-ws", "fastapi"]
DASHES = {"roomcast": "", "tokio-tungstenite": "6,3", "node-ws": "2,3", "fastapi": "8,3,2,3"}
MARKERS = {"roomcast": "circle", "tokio-tungstenite": "square", "node-ws": "triangle", "fastapi": "diamond"}

W, H = 920, 460
ML, MR, MT, MB = 86, 250, 48, 64  # margins: left, right, top, bottom


# ---------------------------------------------------------------------------
# input


def load(paths):
    runs = []
    for p in paths:
        files = sorted(glob.glob(os.path.join(p, "*.jsonl"))) if os.path.isdir(p) else [p]
        for f in files:
            with open(f, encoding="utf-8") as fh:
                for n, line in enumerate(fh, 1):
                    line = line.strip()
                    if not line:
                        continue
                    try:
                        d = json.loads(line)
                    except json.JSONDecodeError as e:
                        print(f"plot.py: {f}:{n}: skipped ({e})", file=sys.stderr)
                        continue
                    if d.get("ok") and d.get("server_name"):
                        d["_file"] = os.path.basename(f)
                        runs.append(d)
    return runs


def servers_in(runs):
    names = {r["server_name"] for r in runs}
    return [s for s in ORDER if s in names] + sorted(names - set(ORDER))


def color(server, i):
    return COLORS.get(server) or EXTRA_COLORS[i % len(EXTRA_COLORS)]


def series(runs, xkey, ykey):
    """{server: [(x, median, lo, hi, n)]} from runs grouped by server and x."""
    groups = {}
    for r in runs:
        x = xkey(r)
        y = r.get("figures", {}).get(ykey)
        if x is None or not isinstance(y, (int, float)):
            continue
        groups.setdefault(r["server_name"], {}).setdefault(x, []).append(float(y))
    out = {}
    for s, byx in groups.items():
        out[s] = [(x, statistics.median(v), min(v), max(v), len(v)) for x, v in sorted(byx.items())]
    return out


# ---------------------------------------------------------------------------
# axes


def nice_step(span, target):
    raw = span / max(target, 1)
    mag = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1
    for m in (1, 2, 2.5, 5, 10):
        if raw <= m * mag:
            return m * mag
    return 10 * mag


class Linear:
    def __init__(self, lo, hi, ticks=6, zero=True):
        if zero:
            lo = min(lo, 0.0)
        if hi <= lo:
            hi = lo + 1.0
        step = nice_step(hi - lo, ticks)
        self.lo = math.floor(lo / step) * step
        self.hi = math.ceil(hi / step) * step
        self.step = step

    def frac(self, v):
        return (v - self.lo) / (self.hi - self.lo)

    def ticks(self):
        out, v = [], self.lo
        while v <= self.hi + self.step * 1e-9:
            out.append(v)
            v += self.step
        return [(t, t) for t in out]


class Log:
    def __init__(self, lo, hi, marks=(1, 2, 5)):
        lo, hi = max(lo, 1e-12), max(hi, 1e-12)
        if hi < lo * 1.5:  # one value, or nearly: give it room on both sides
            lo, hi = lo / 2, hi * 2
        self.lo = 10 ** math.floor(math.log10(lo) + 1e-9)
        self.hi = 10 ** math.ceil(math.log10(hi) - 1e-9)
        if self.hi <= self.lo:
            self.hi = self.lo * 10
        # Tighten to 1-2-5 marks that still contain the data.
        cands = sorted({m * 10**e for e in range(int(math.log10(self.lo)) - 1, int(math.log10(self.hi)) + 1) for m in marks})
        below = [c for c in cands if c <= lo * (1 + 1e-9)]
        above = [c for c in cands if c >= hi * (1 - 1e-9)]
        if below:
            self.lo = max(below)
        if above:
            self.hi = min(above)
        self.marks = marks

    def frac(self, v):
        v = max(v, 1e-12)
        return (math.log10(v) - math.log10(self.lo)) / (math.log10(self.hi) - math.log10(self.lo))

    def ticks(self):
        out = []
        e = math.floor(math.log10(self.lo))
        while 10**e <= self.hi * (1 + 1e-9):
            for m in self.marks:
                v = m * 10**e
                if self.lo * (1 - 1e-9) <= v <= self.hi * (1 + 1e-9):
                    out.append((v, v))
            e += 1
        return out


class Nines:
    """Percentile axis where each "nine" (90, 99, 99.9 …) is one unit: x = −log10(1 − p/100)."""

    def __init__(self, top=99.99):
        self.lo = 0.0
        self.hi = -math.log10(1 - top / 100.0)

    def frac(self, p):
        p = min(p, 99.9999)
        return (-math.log10(1 - p / 100.0) - self.lo) / (self.hi - self.lo)

    def ticks(self):
        ps = [0, 50, 75, 90, 95, 99, 99.5, 99.9, 99.95, 99.99]
        return [(p, p) for p in ps if self.frac(p) <= 1 + 1e-9]


def fmt_num(v):
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 1e6:
        s = f"{v / 1e6:.3g}M"
    elif a >= 1e4 or (a >= 1000 and v % 1000 == 0):
        s = f"{v / 1e3:.3g}k"
    elif a >= 1000:
        s = f"{v:,.0f}"
    elif a >= 1:
        s = f"{v:.3g}"
    else:
        s = f"{v:.2g}"
    return s


def fmt_pct(p):
    return f"{p:g}%"


# ---------------------------------------------------------------------------
# SVG


class Svg:
    def __init__(self, title, subtitle=""):
        self.parts = []
        self.title = title
        self.subtitle = subtitle
        self.pw = W - ML - MR
        self.ph = H - MT - MB

    def add(self, s):
        self.parts.append(s)

    def text(self, x, y, s, size=12, anchor="start", weight="normal", rotate=None, fill="#222"):
        tr = f' transform="rotate({rotate} {x:.1f} {y:.1f})"' if rotate is not None else ""
        self.add(
            f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}" '
            f'font-weight="{weight}" fill="{fill}"{tr}>{escape(s)}</text>'
        )

    def px(self, fx):
        return ML + fx * self.pw

    def py(self, fy):
        return MT + (1 - fy) * self.ph

    def axes(self, xs, ys, xlabel, ylabel, xfmt=fmt_num, yfmt=fmt_num):
        self.xs, self.ys = xs, ys
        self.add(f'<rect x="{ML}" y="{MT}" width="{self.pw}" height="{self.ph}" fill="#fff" stroke="#444"/>')
        for v, lab in ys.ticks():
            y = self.py(ys.frac(v))
            self.add(f'<line x1="{ML}" y1="{y:.1f}" x2="{ML + self.pw}" y2="{y:.1f}" stroke="#e4e4e4"/>')
            self.add(f'<line x1="{ML - 5}" y1="{y:.1f}" x2="{ML}" y2="{y:.1f}" stroke="#444"/>')
            self.text(ML - 8, y + 4, yfmt(lab), size=11, anchor="end")
        for v, lab in xs.ticks():
            x = self.px(xs.frac(v))
            self.add(f'<line x1="{x:.1f}" y1="{MT}" x2="{x:.1f}" y2="{MT + self.ph}" stroke="#eeeeee"/>')
            self.add(f'<line x1="{x:.1f}" y1="{MT + self.ph}" x2="{x:.1f}" y2="{MT + self.ph + 5}" stroke="#444"/>')
            self.text(x, MT + self.ph + 19, xfmt(lab), size=11, anchor="middle")
        self.text(ML + self.pw / 2, H - 16, xlabel, size=13, anchor="middle")
        self.text(20, MT + self.ph / 2, ylabel, size=13, anchor="middle", rotate=-90)

    def xy(self, x, y):
        return self.px(self.xs.frac(x)), self.py(self.ys.frac(y))

    def marker(self, kind, x, y, c):
        r = 4
        if kind == "square":
            self.add(f'<rect x="{x - r:.1f}" y="{y - r:.1f}" width="{2 * r}" height="{2 * r}" fill="{c}"/>')
        elif kind == "triangle":
            self.add(f'<polygon points="{x:.1f},{y - r - 1:.1f} {x + r + 1:.1f},{y + r:.1f} {x - r - 1:.1f},{y + r:.1f}" fill="{c}"/>')
        elif kind == "diamond":
            self.add(f'<polygon points="{x:.1f},{y - r - 1:.1f} {x + r + 1:.1f},{y:.1f} {x:.1f},{y + r + 1:.1f} {x - r - 1:.1f},{y:.1f}" fill="{c}"/>')
        else:
            self.add(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{r}" fill="{c}"/>')

    def line(self, pts, c, dash="", width=2.0, server=None, markers=True, whiskers=None):
        if not pts:
            return
        d = " ".join(f"{'M' if i == 0 else 'L'}{x:.1f},{y:.1f}" for i, (x, y) in enumerate(pts))
        da = f' stroke-dasharray="{dash}"' if dash else ""
        self.add(f'<path d="{d}" fill="none" stroke="{c}" stroke-width="{width}"{da} stroke-linejoin="round"/>')
        if whiskers:
            for x, ylo, yhi in whiskers:
                if abs(yhi - ylo) > 0.5:
                    self.add(f'<line x1="{x:.1f}" y1="{ylo:.1f}" x2="{x:.1f}" y2="{yhi:.1f}" stroke="{c}" stroke-width="1.2"/>')
                    for yy in (ylo, yhi):
                        self.add(f'<line x1="{x - 3:.1f}" y1="{yy:.1f}" x2="{x + 3:.1f}" y2="{yy:.1f}" stroke="{c}" stroke-width="1.2"/>')
        if markers:
            for x, y in pts:
                self.marker(MARKERS.get(server, "circle"), x, y, c)

    def hline(self, y, label, c="#555"):
        _, yy = self.xy(self.xs.lo if not isinstance(self.xs, Nines) else 0, y)
        self.add(f'<line x1="{ML}" y1="{yy:.1f}" x2="{ML + self.pw}" y2="{yy:.1f}" stroke="{c}" stroke-dasharray="4,4"/>')
        self.text(ML + self.pw - 6, yy - 5, label, size=11, anchor="end", fill=c)

    def legend(self, entries):
        if not entries:
            return
        # Outside the plot, on the right: never hides a line.
        w = MR - 20
        h = 18 * len(entries) + 10
        x = ML + self.pw + 12
        y = MT
        self.add(f'<rect x="{x:.1f}" y="{y:.1f}" width="{w:.1f}" height="{h}" fill="#fff" fill-opacity="0.92" stroke="#999"/>')
        for i, (label, c, dash, server) in enumerate(entries):
            yy = y + 16 + 18 * i
            da = f' stroke-dasharray="{dash}"' if dash else ""
            self.add(f'<line x1="{x + 8:.1f}" y1="{yy - 4:.1f}" x2="{x + 34:.1f}" y2="{yy - 4:.1f}" stroke="{c}" stroke-width="2"{da}/>')
            self.marker(MARKERS.get(server, "circle"), x + 21, yy - 4, c)
            self.text(x + 40, yy, label, size=12)

    def render(self):
        head = (
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" '
            f'font-family="DejaVu Sans, Helvetica, Arial, sans-serif">'
        )
        bg = f'<rect width="{W}" height="{H}" fill="#fafafa"/>'
        title = f'<text x="{ML}" y="22" font-size="15" font-weight="bold" fill="#111">{escape(self.title)}</text>'
        sub = f'<text x="{ML}" y="38" font-size="11" fill="#555">{escape(self.subtitle)}</text>' if self.subtitle else ""
        return "\n".join([head, bg, title, sub] + self.parts + ["</svg>", ""])


# ---------------------------------------------------------------------------
# plots


def xy_plot(data, title, subtitle, xlabel, ylabel, xscale, yscale, yfmt=fmt_num, hline=None):
    svg = Svg(title, subtitle)
    allx = [p[0] for pts in data.values() for p in pts]
    ally = [v for pts in data.values() for p in pts for v in (p[2], p[3])]
    if hline:
        ally.append(hline[0])
    if not allx:
        svg.text(W / 2, H / 2, "no data", size=16, anchor="middle")
        return svg.render()
    xs = Log(min(allx), max(allx)) if xscale == "log" else Linear(0, max(allx) * 1.04)
    ys = Log(min(ally), max(ally)) if yscale == "log" else Linear(0, max(ally) * 1.05)
    svg.axes(xs, ys, xlabel, ylabel, yfmt=yfmt)
    if hline:
        svg.hline(*hline)
    entries = []
    for i, s in enumerate(servers_in([{"server_name": k} for k in data])):
        c = color(s, i)
        pts = [svg.xy(x, y) for x, y, _, _, _ in data[s]]
        wh = [(svg.xy(x, lo)[0], svg.xy(x, lo)[1], svg.xy(x, hi)[1]) for x, _, lo, hi, _ in data[s]]
        svg.line(pts, c, DASHES.get(s, ""), server=s, whiskers=wh)
        entries.append((s, c, DASHES.get(s, ""), s))
    svg.legend(entries)
    return svg.render()


def reps_note(data):
    ns = sorted({p[4] for pts in data.values() for p in pts})
    if not ns:
        return "no runs"
    return f"median of {ns[0]}" + (f"–{ns[-1]}" if ns[-1] != ns[0] else "") + " run(s) per point; whiskers: min–max"


def cdf_plot(runs, title, subtitle):
    svg = Svg(title, subtitle)
    chosen = {}
    for s in servers_in(runs):
        rs = [r for r in runs if r["server_name"] == s and r.get("figures", {}).get("latency_cdf")]
        if not rs:
            continue
        rs.sort(key=lambda r: r["figures"].get("latency_p99_us", 0))
        chosen[s] = rs[(len(rs) - 1) // 2]
    if not chosen:
        svg.text(W / 2, H / 2, "no latency_cdf in the runs", size=16, anchor="middle")
        return svg.render(), chosen
    allx = [pt[1] / 1000.0 for r in chosen.values() for pt in r["figures"]["latency_cdf"]]
    xs = Log(max(min(allx), 0.001), max(allx))
    ys = Nines(99.99)
    svg.axes(xs, ys, "latency, send → receive (ms, log scale)", "percentile (one unit per nine)", xfmt=fmt_num, yfmt=fmt_pct)
    entries = []
    for i, (s, r) in enumerate(chosen.items()):
        c = color(s, i)
        pts = [svg.xy(max(us / 1000.0, xs.lo), p) for p, us in r["figures"]["latency_cdf"]]
        svg.line(pts, c, DASHES.get(s, ""), server=s, markers=False)
        p99 = r["figures"].get("latency_p99_us")
        x, y = svg.xy(max(p99 / 1000.0, xs.lo), 99.0)
        svg.marker(MARKERS.get(s, "circle"), x, y, c)
        entries.append((f"{s} (p99 {p99 / 1000.0:.2f} ms)", c, DASHES.get(s, ""), s))
    svg.legend(entries)
    return svg.render(), chosen


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", nargs="+", default=["target/bench-results/campaign-latest"],
                    help="directories of *.jsonl or .jsonl files (default: target/bench-results/campaign-latest)")
    ap.add_argument("--out", default="docs/bench", help="output directory (default: docs/bench)")
    ap.add_argument("--cdf-rate", type=float, default=1000.0, help="--rate of the fanout runs drawn as CDFs (default 1000)")
    a = ap.parse_args()

    runs = load(a.results)
    if not runs:
        print(f"plot.py: no successful runs in {' '.join(a.results)}", file=sys.stderr)
        return 1
    os.makedirs(a.out, exist_ok=True)
    written = []

    def write(name, text):
        path = os.path.join(a.out, name)
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(text)
        written.append(path)

    def p(r, k):
        return r.get("params", {}).get(k)

    # Fanout sweep: 1 room, --rate 0 (max rate), every room size; the most common
    # --in-flight/--size so the points compare like with like.
    sweep = [r for r in runs if r["workload"] == "fanout" and p(r, "rate") == 0 and p(r, "rooms") == 1]
    if sweep:
        common = statistics.mode([(p(r, "in_flight"), p(r, "size"), p(r, "publishers")) for r in sweep])
        sweep = [r for r in sweep if (p(r, "in_flight"), p(r, "size"), p(r, "publishers")) == common]
        inflight, size, pubs = common
        sub = f"1 room, {pubs} publisher, --rate 0, --in-flight {inflight}, {size}-byte content; "
        data = series(sweep, lambda r: p(r, "members"), "deliveries_per_s")
        write("fanout-deliveries.svg", xy_plot(
            data, "Fanout: deliveries per second against room size", sub + reps_note(data),
            "members in the room (log scale)", "deliveries / s", "log", "linear"))
        data = series(sweep, lambda r: p(r, "members"), "latency_p99_us")
        data = {s: [(x, m / 1000, lo / 1000, hi / 1000, n) for x, m, lo, hi, n in pts] for s, pts in data.items()}
        write("fanout-p99.svg", xy_plot(
            data, "Fanout at max rate: p99 latency against room size", sub + reps_note(data),
            "members in the room (log scale)", "p99 send → receive (ms, log scale)", "log", "log"))
        data = series(sweep, lambda r: p(r, "members"), "server_cpu_us_per_delivery")
        write("fanout-cpu.svg", xy_plot(
            data, "Fanout: server CPU per delivery against room size", sub + reps_note(data),
            "members in the room (log scale)", "server CPU µs per delivery (log scale)", "log", "log"))

    idle = [r for r in runs if r["workload"] == "idle"]
    if idle:
        data = series(idle, lambda r: r["figures"].get("connections_joined"), "server_rss_per_conn_bytes")
        data = {s: [(x, m / 1024, lo / 1024, hi / 1024, n) for x, m, lo, hi, n in pts] for s, pts in data.items()}
        write("idle-rss.svg", xy_plot(
            data, "Idle joined connections: server RSS per connection",
            "(RSS after − RSS before) ÷ joined connections; " + reps_note(data),
            "joined connections", "server RSS per connection (KiB, log scale)", "linear", "log", hline=(2.0, "target ≤ 2 KiB")))

    lat = [r for r in runs if r["workload"] == "fanout" and p(r, "rate") == a.cdf_rate and p(r, "members") == 100]
    if lat:
        text, chosen = cdf_plot(
            lat, f"Latency CDF: fanout 1 room × 100 members at {a.cdf_rate:g} msgs/s",
            "per server the run with the median p99; marker at p99")
        write("latency-cdf.svg", text)

    for w in written:
        print(w)
    return 0


if __name__ == "__main__":
    sys.exit(main())
