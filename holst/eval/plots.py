"""Small PNG plots drawn with Pillow (matplotlib is not a dependency): bars, histograms, heat maps, grids.

Every function returns a PIL image; :func:`holst.utils.images.save_png` writes it deterministically.
Text uses DejaVu Sans when the system has it (Cyrillic captions), else Pillow's built-in font.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

import torch
from PIL import Image, ImageDraw, ImageFont

_FONT_PATHS = ("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf", "/usr/share/fonts/dejavu/DejaVuSans.ttf",
               "/Library/Fonts/Arial Unicode.ttf", "C:/Windows/Fonts/arial.ttf")
BAR = (66, 110, 180)
INK = (30, 30, 30)
GRID = (225, 225, 225)


@lru_cache(maxsize=8)
def font(size: int = 12) -> ImageFont.ImageFont:
    """A TrueType font with Cyrillic if one is installed, else Pillow's default font."""
    for path in _FONT_PATHS:
        try:
            return ImageFont.truetype(path, size)
        except OSError:
            continue
    return ImageFont.load_default(size)


def has_cyrillic_font() -> bool:
    """Whether :func:`font` can draw Russian captions (else grids label rows by number only)."""
    f = font(12)
    return getattr(f, "path", "") in _FONT_PATHS


def _fmt(v: float) -> str:
    if v == 0 or not math.isfinite(v):
        return str(v)
    return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.2e}"


def _axes(title: str, width: int, height: int) -> tuple[Image.Image, ImageDraw.ImageDraw, tuple[int, int, int, int]]:
    """A white canvas with a title; returns (image, draw, plot box (left, top, right, bottom))."""
    im = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(im)
    d.text((10, 6), title, fill=INK, font=font(14))
    return im, d, (60, 30, width - 15, height - 40)


def _y_axis(d: ImageDraw.ImageDraw, box: tuple[int, int, int, int], lo: float, hi: float) -> None:
    left, top, right, bottom = box
    for i in range(5):
        v = lo + (hi - lo) * i / 4
        y = bottom - (bottom - top) * i / 4
        d.line((left, y, right, y), fill=GRID)
        d.text((4, y - 6), _fmt(v), fill=INK, font=font(10))
    d.line((left, top, left, bottom), fill=INK)
    d.line((left, bottom, right, bottom), fill=INK)


def bar_chart(values: Sequence[float], labels: Sequence[str], title: str, *, width: int = 560, height: int = 300,
              y_max: float | None = None) -> Image.Image:
    """Vertical bars with value labels (e.g. per-attribute accuracy)."""
    im, d, box = _axes(title, width, height)
    left, top, right, bottom = box
    finite = [v for v in values if math.isfinite(v)]
    hi = y_max if y_max is not None else max(finite + [1e-12]) * 1.1
    _y_axis(d, box, 0.0, hi)
    n = max(len(values), 1)
    slot = (right - left) / n
    for i, (v, lab) in enumerate(zip(values, labels)):
        x0, x1 = left + slot * i + slot * 0.15, left + slot * (i + 0.85)
        if math.isfinite(v):
            y = bottom - (bottom - top) * min(max(v, 0.0), hi) / hi
            d.rectangle((x0, y, x1, bottom), fill=BAR)
            d.text((x0, y - 13), _fmt(v), fill=INK, font=font(10))
        d.text((x0, bottom + 4), str(lab)[:14], fill=INK, font=font(10))
    return im


LINE_COLOURS = ((66, 110, 180), (210, 90, 40), (60, 150, 70), (150, 60, 170), (120, 120, 120))


def line_chart(series: dict[str, tuple[Sequence[float], Sequence[float]]], title: str, *, width: int = 560,
               height: int = 300, x_label: str = "step") -> Image.Image:
    """Lines of (x, y) points, one colour per series, with a legend (e.g. training curves)."""
    im, d, box = _axes(title, width, height)
    left, top, right, bottom = box
    points = [(float(x), float(y)) for xs, ys in series.values() for x, y in zip(xs, ys) if math.isfinite(float(y))]
    if not points:
        d.text((left + 10, top + 10), "no finite values", fill=INK, font=font(12))
        return im
    x_lo, x_hi = min(p[0] for p in points), max(p[0] for p in points)
    y_lo, y_hi = min(p[1] for p in points), max(p[1] for p in points)
    x_hi, y_hi = (x_hi if x_hi > x_lo else x_lo + 1.0), (y_hi if y_hi > y_lo else y_lo + 1.0)
    _y_axis(d, box, y_lo, y_hi)

    def to_px(x: float, y: float) -> tuple[float, float]:
        px = left + (right - left) * (x - x_lo) / (x_hi - x_lo)
        return px, bottom - (bottom - top) * (y - y_lo) / (y_hi - y_lo)

    for i, (name, (xs, ys)) in enumerate(series.items()):
        colour = LINE_COLOURS[i % len(LINE_COLOURS)]
        pts = [to_px(float(x), float(y)) for x, y in zip(xs, ys) if math.isfinite(float(y))]
        if len(pts) > 1:
            d.line(pts, fill=colour, width=2)
        d.text((right - 150, top + 4 + 14 * i), name, fill=colour, font=font(11))
    d.text((left, bottom + 4), _fmt(x_lo), fill=INK, font=font(10))
    d.text((right - 40, bottom + 4), _fmt(x_hi), fill=INK, font=font(10))
    d.text(((left + right) // 2 - 20, bottom + 18), x_label, fill=INK, font=font(11))
    return im


def histogram(values: Sequence[float] | torch.Tensor, title: str, *, bins: int = 30, width: int = 560,
              height: int = 300, x_label: str = "") -> Image.Image:
    """A histogram of values (e.g. bits per image token of each held-out image)."""
    v = torch.as_tensor(values, dtype=torch.float64).flatten()
    v = v[torch.isfinite(v)]
    im, d, box = _axes(title, width, height)
    left, top, right, bottom = box
    if v.numel() == 0:
        d.text((left + 10, top + 10), "no finite values", fill=INK, font=font(12))
        return im
    lo, hi = float(v.min()), float(v.max())
    if hi <= lo:
        hi = lo + 1.0
    counts = torch.histc(v, bins=bins, min=lo, max=hi)
    _y_axis(d, box, 0.0, float(counts.max()))
    slot = (right - left) / bins
    for i, c in enumerate(counts.tolist()):
        y = bottom - (bottom - top) * c / max(float(counts.max()), 1.0)
        d.rectangle((left + slot * i, y, left + slot * (i + 1) - 1, bottom), fill=BAR)
    d.text((left, bottom + 4), _fmt(lo), fill=INK, font=font(10))
    d.text((right - 40, bottom + 4), _fmt(hi), fill=INK, font=font(10))
    d.text(((left + right) // 2 - 30, bottom + 18), x_label, fill=INK, font=font(11))
    return im


def sorted_frequency_plot(counts: Sequence[float] | torch.Tensor, title: str, *, width: int = 560,
                          height: int = 300) -> Image.Image:
    """Counts sorted from most to least used, on a log10(1 + count) scale (codebook usage)."""
    c = torch.as_tensor(counts, dtype=torch.float64).flatten().sort(descending=True).values
    y = torch.log10(1 + c)
    im, d, box = _axes(title, width, height)
    left, top, right, bottom = box
    hi = max(float(y.max()), 1e-9)
    _y_axis(d, box, 0.0, hi)
    n = c.numel()
    points = [(left + (right - left) * i / max(n - 1, 1), bottom - (bottom - top) * float(y[i]) / hi) for i in range(n)]
    if len(points) > 1:
        d.line(points, fill=BAR, width=2)
    d.text((left, bottom + 4), "code rank (most used first) ->   y: log10(1 + count)", fill=INK, font=font(10))
    return im


def heatmap(matrix: torch.Tensor, title: str, *, cell: int = 24) -> Image.Image:
    """A (R, C) matrix as a grey-to-blue heat map with its min/max printed; NaN cells are white."""
    m = matrix.double()
    finite = m[torch.isfinite(m)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.numel() else (0.0, 1.0)
    span = hi - lo if hi > lo else 1.0
    R, C = m.shape
    im = Image.new("RGB", (max(C * cell + 20, 20 + 8 * len(title)), R * cell + 56), "white")
    d = ImageDraw.Draw(im)
    d.text((10, 6), title, fill=INK, font=font(13))
    for r in range(R):
        for c in range(C):
            v = float(m[r, c])
            if math.isfinite(v):
                t = (v - lo) / span
                colour = (int(240 - 200 * t), int(240 - 160 * t), int(245 - 80 * t))
            else:
                colour = (255, 255, 255)
            d.rectangle((10 + c * cell, 28 + r * cell, 10 + (c + 1) * cell - 1, 28 + (r + 1) * cell - 1), fill=colour)
    d.text((10, 32 + R * cell), f"light {_fmt(lo)} .. dark {_fmt(hi)}", fill=INK, font=font(10))
    return im


def labeled_grid(rows: Sequence[Sequence[Image.Image]], row_labels: Sequence[str], *, cell: int = 96,
                 label_width: int = 260, padding: int = 2) -> Image.Image:
    """Rows of images with a text label left of each row (captions x images).

    Labels are cut to fit; without a Cyrillic font they should be row numbers (see :func:`has_cyrillic_font`).
    """
    n_cols = max((len(r) for r in rows), default=1)
    W = label_width + n_cols * (cell + padding) + padding
    H = len(rows) * (cell + padding) + padding
    im = Image.new("RGB", (W, max(H, cell)), "white")
    d = ImageDraw.Draw(im)
    f = font(12)
    chars = max(8, label_width // 7)
    for r, (images, label) in enumerate(zip(rows, row_labels)):
        y = padding + r * (cell + padding)
        words, lines, line = str(label).split(), [], ""
        for w in words:  # simple word wrap into the label column
            if len(line) + len(w) + 1 > chars and line:
                lines.append(line)
                line = w
            else:
                line = f"{line} {w}".strip()
        lines.append(line)
        for k, text in enumerate(lines[: max(1, cell // 15)]):
            d.text((4, y + 4 + 15 * k), text, fill=INK, font=f)
        for c, image in enumerate(images):
            tile = image.convert("RGB").resize((cell, cell), Image.Resampling.NEAREST if image.width < cell
                                               else Image.Resampling.LANCZOS)
            im.paste(tile, (label_width + padding + c * (cell + padding), y))
    return im
