"""Hand-written SVG plots of the peers benchmark (standard library only).

- latency(): every run of every tool as a dot on a log-scale time axis, min-max line, p50 tick.
- breakdown(): where spark's own time goes, one bar per spark series, each bar scaled to its
  own total so that the small parts stay visible; the segments carry their milliseconds.
"""

import math
from html import escape

FONT = "font-family='DejaVu Sans, Helvetica, Arial, sans-serif'"
COLORS = {"spark": "#d9480f", "codex": "#1c7ed6", "aider": "#2b8a3e"}
PARTS = [
    ("client_ms", "sparkctl process + socket (wall - daemon total)", "#868e96"),
    ("request_ms", "daemon: request in -> response.create out", "#f08c00"),
    ("ttft_ms", "response.create out -> first delta in (fake model)", "#4dabf7"),
    ("stream_ms", "first delta -> patch complete", "#74c0fc"),
    ("apply_ms", "apply + record the edit", "#d9480f"),
]


def _fmt(ms):
    if ms < 10:
        return f"{ms:.2f} ms"
    if ms < 1000:
        return f"{ms:.1f} ms"
    return f"{ms / 1000:.2f} s"


def _pct(values, q):
    s = sorted(values)
    return s[round((len(s) - 1) * q)]


def latency(groups, title):
    """groups: [(heading, [(label, tool, samples_ms)])]."""
    rows = [(h, None) for h, _ in groups]
    all_ms = [v for _, series in groups for _, _, s in series for v in s]
    lo = 10 ** math.floor(math.log10(max(min(all_ms), 1e-3)))
    hi = 10 ** math.ceil(math.log10(max(all_ms)))
    left, right, top, row_h, head_h = 290, 100, 58, 30, 28
    plot_w = 560
    n_rows = sum(len(s) for _, s in groups)
    height = top + n_rows * row_h + len(groups) * head_h + 48
    width = left + plot_w + right

    def x(ms):
        return left + (math.log10(ms) - math.log10(lo)) / (math.log10(hi) - math.log10(lo)) * plot_w

    out = [f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' viewBox='0 0 {width} {height}' {FONT} font-size='12'>",
           f"<rect width='{width}' height='{height}' fill='white'/>",
           f"<text x='{width / 2}' y='22' text-anchor='middle' font-size='15' font-weight='bold'>{escape(title)}</text>",
           f"<text x='{width / 2}' y='40' text-anchor='middle' fill='#555'>each dot one edit; line min to max; tick and number: p50 (log scale)</text>"]
    y = top
    grid_top = top
    body = []
    for heading, series in groups:
        body.append(f"<text x='8' y='{y + 18}' font-weight='bold' fill='#333'>{escape(heading)}</text>")
        y += head_h
        for label, tool, samples in series:
            cy = y + row_h / 2
            color = COLORS.get(tool, "#495057")
            body.append(f"<text x='{left - 10}' y='{cy + 4}' text-anchor='end'>{escape(label)}</text>")
            if samples:
                body.append(f"<line x1='{x(min(samples)):.1f}' x2='{x(max(samples)):.1f}' y1='{cy}' y2='{cy}' stroke='{color}' stroke-opacity='0.5'/>")
                for i, v in enumerate(samples):
                    jitter = ((i * 7919) % 11 - 5) * 1.6
                    body.append(f"<circle cx='{x(v):.1f}' cy='{cy + jitter:.1f}' r='2.6' fill='{color}' fill-opacity='0.55'/>")
                p50 = _pct(samples, 0.5)
                body.append(f"<line x1='{x(p50):.1f}' x2='{x(p50):.1f}' y1='{cy - 11}' y2='{cy + 11}' stroke='black' stroke-width='2.5'/>")
                body.append(f"<text x='{left + plot_w + 8}' y='{cy + 4}'>{_fmt(p50)}</text>")
            else:
                body.append(f"<text x='{left + 8}' y='{cy + 4}' fill='#c92a2a'>not measured (see report)</text>")
            y += row_h
    grid = []
    decade = lo
    while decade <= hi * 1.0001:
        for m in (1, 2, 5):
            v = decade * m
            if v < lo or v > hi * 1.0001:
                continue
            gx = x(v)
            strong = m == 1
            grid.append(f"<line x1='{gx:.1f}' x2='{gx:.1f}' y1='{grid_top}' y2='{y}' stroke='#dee2e6' stroke-width='{1.2 if strong else 0.6}'/>")
            if strong or m == 5:
                tick = f"{v:g} ms" if v < 1000 else f"{v / 1000:g} s"
                grid.append(f"<text x='{gx:.1f}' y='{y + 16}' text-anchor='middle' fill='#555' font-size='11'>{tick}</text>")
        decade *= 10
    out += grid + body
    out.append(f"<text x='{left + plot_w / 2}' y='{y + 36}' text-anchor='middle' fill='#333'>wall time per edit, process start to exit</text>")
    out.append("</svg>")
    return "\n".join(out) + "\n"


def breakdown(rows, title):
    """rows: [(label, {part: p50_ms}, wall_p50_ms)]."""
    left, right, top, row_h = 250, 30, 60, 46
    plot_w = 600
    legend_h = 22 * len(PARTS) + 20
    height = top + len(rows) * row_h + legend_h
    width = left + plot_w + right
    out = [f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' viewBox='0 0 {width} {height}' {FONT} font-size='12'>",
           f"<rect width='{width}' height='{height}' fill='white'/>",
           f"<text x='{width / 2}' y='22' text-anchor='middle' font-size='15' font-weight='bold'>{escape(title)}</text>",
           f"<text x='{width / 2}' y='40' text-anchor='middle' fill='#555'>p50 of each part; each bar scaled to its own total</text>"]
    y = top
    for label, parts, wall in rows:
        total = sum(max(parts.get(k, 0.0), 0.0) for k, _, _ in PARTS) or 1.0
        out.append(f"<text x='{left - 10}' y='{y + 14}' text-anchor='end'>{escape(label)}</text>")
        out.append(f"<text x='{left - 10}' y='{y + 29}' text-anchor='end' fill='#555' font-size='11'>sum {_fmt(total)}, wall p50 {_fmt(wall)}</text>")
        x0 = left
        for key, _, color in PARTS:
            v = max(parts.get(key, 0.0), 0.0)
            w = v / total * plot_w
            if w <= 0:
                continue
            out.append(f"<rect x='{x0:.1f}' y='{y}' width='{w:.1f}' height='32' fill='{color}' stroke='white'/>")
            text = _fmt(v)
            if w > len(text) * 6.5 + 6:
                out.append(f"<text x='{x0 + w / 2:.1f}' y='{y + 20}' text-anchor='middle' fill='white' font-size='11'>{text}</text>")
            x0 += w
        y += row_h
    y += 10
    for key, name, color in PARTS:
        out.append(f"<rect x='{left}' y='{y}' width='14' height='14' fill='{color}'/>")
        out.append(f"<text x='{left + 20}' y='{y + 11}'>{escape(name)}</text>")
        y += 22
    out.append("</svg>")
    return "\n".join(out) + "\n"
