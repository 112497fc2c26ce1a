"""Small inline SVG charts for the gate report.

Written by hand rather than with a plotting library so that the report stays one
static file that renders offline anywhere (no scripts, fonts or CDNs), and the gate
does not pull matplotlib into a data pipeline. Two shapes are enough: grouped
horizontal bars (a value per group, per series) and 100%-stacked horizontal bars
(a mix per group).
"""

from __future__ import annotations

from html import escape

PALETTE = ("#3465a4", "#f57900", "#4e9a06", "#75507b", "#c17d11", "#cc0000", "#555753", "#06989a")
LABEL_W, BAR_W, ROW_H, GAP = 160, 250, 16, 10


def _text(x: float, y: float, s: str, anchor: str = "start", size: int = 11, fill: str = "#222") -> str:
    return (f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}" fill="{fill}" '
            f'font-family="sans-serif">{escape(s)}</text>')


def _legend(names: list[str], y: float, colors: tuple[str, ...] = PALETTE, line: str | None = None) -> str:
    """Colour keys for `names`, and a dashed-line key for `line` (a marker) when given."""
    parts, x = [], LABEL_W
    for i, name in enumerate(names):
        parts.append(f'<rect x="{x}" y="{y - 9}" width="10" height="10" fill="{colors[i % len(colors)]}"/>')
        parts.append(_text(x + 14, y, name))
        x += 24 + 7 * len(name)
    if line:
        parts.append(f'<line x1="{x}" y1="{y - 4}" x2="{x + 14}" y2="{y - 4}" stroke="#000" stroke-dasharray="4,3"/>')
        parts.append(_text(x + 18, y, line))
    return "".join(parts)


def grouped_bars(title: str, groups: list[str], series: dict[str, list[float | None]], *,
                 kind: str, scale: float | None = None, marker: float | None = None, percent: bool = True) -> str:
    """One row per group, one bar per series; None draws a hatched 'suppressed' placeholder.

    `marker` draws a vertical reference line (e.g. the overall rate).
    """
    values = [v for vs in series.values() for v in vs if v is not None]
    top = scale or max([*values, marker or 0.0, 1e-9])
    n_series = len(series)
    block = n_series * ROW_H + GAP
    height = 34 + len(groups) * block + 24
    width = LABEL_W + BAR_W + 70
    out = [f'<svg class="plot" data-plot="{escape(kind)}" xmlns="http://www.w3.org/2000/svg" '
           f'width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" aria-label="{escape(title)}">',
           f"<title>{escape(title)}</title>", _text(4, 14, title, size=12, fill="#000")]
    for gi, group in enumerate(groups):
        y0 = 30 + gi * block
        out.append(_text(LABEL_W - 6, y0 + block / 2, group[:30], anchor="end"))
        for si, (name, vals) in enumerate(series.items()):
            v = vals[gi]
            y = y0 + si * ROW_H
            color = PALETTE[si % len(PALETTE)]
            if v is None:
                out.append(f'<rect x="{LABEL_W}" y="{y}" width="{BAR_W / 6:.1f}" height="{ROW_H - 3}" fill="none" '
                           f'stroke="{color}" stroke-dasharray="3,2"/>')
                out.append(_text(LABEL_W + BAR_W / 6 + 4, y + ROW_H - 5, "suppressed", size=10, fill="#555"))
                continue
            w = max(BAR_W * v / top, 0.5)
            label = f"{v * 100:.1f}%" if percent else f"{v:.3g}"
            out.append(f'<rect x="{LABEL_W}" y="{y}" width="{w:.1f}" height="{ROW_H - 3}" fill="{color}">'
                       f"<title>{escape(group)} – {escape(name)}: {label}</title></rect>")
            out.append(_text(LABEL_W + w + 4, y + ROW_H - 5, label, size=10))
    if marker is not None:
        x = LABEL_W + BAR_W * marker / top
        out.append(f'<line x1="{x:.1f}" y1="24" x2="{x:.1f}" y2="{height - 26}" stroke="#000" stroke-dasharray="4,3"/>')
    out.append(_legend(list(series), height - 8, line="overall" if marker is not None else None))
    out.append("</svg>")
    return "".join(out)


def stacked_bars(title: str, groups: list[str], parts: list[str], shares: list[list[float | None]], *, kind: str,
                 colors: tuple[str, ...] = PALETTE) -> str:
    """One 100% bar per group split into `parts` (shares[group][part]); a group with a None share is drawn empty."""
    height = 34 + len(groups) * (ROW_H + GAP) + 24
    width = LABEL_W + BAR_W + 70
    out = [f'<svg class="plot" data-plot="{escape(kind)}" xmlns="http://www.w3.org/2000/svg" '
           f'width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" aria-label="{escape(title)}">',
           f"<title>{escape(title)}</title>", _text(4, 14, title, size=12, fill="#000")]
    for gi, group in enumerate(groups):
        y = 30 + gi * (ROW_H + GAP)
        out.append(_text(LABEL_W - 6, y + ROW_H - 4, group[:30], anchor="end"))
        row = shares[gi]
        if any(s is None for s in row):
            out.append(f'<rect x="{LABEL_W}" y="{y}" width="{BAR_W}" height="{ROW_H}" fill="none" stroke="#888" '
                       f'stroke-dasharray="3,2"/>')
            out.append(_text(LABEL_W + 6, y + ROW_H - 4, "suppressed (small counts)", size=10, fill="#555"))
            continue
        x = float(LABEL_W)
        for pi, s in enumerate(row):
            w = BAR_W * (s or 0.0)
            if w <= 0:
                continue
            out.append(f'<rect x="{x:.1f}" y="{y}" width="{w:.1f}" height="{ROW_H}" fill="{colors[pi % len(colors)]}">'
                       f"<title>{escape(group)} – {escape(parts[pi])}: {(s or 0) * 100:.1f}%</title></rect>")
            x += w
    out.append(_legend(parts, height - 8, colors))
    out.append("</svg>")
    return "".join(out)


__all__ = ["grouped_bars", "stacked_bars"]
