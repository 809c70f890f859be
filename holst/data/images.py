"""Robust image decoding, resizing/cropping and the skip report shared by every loader.

Bad input never crashes a run: :func:`decode_image` raises :class:`BadSample` with a short reason
(``empty``, ``not_image``, ``truncated``, ``corrupt``, ``too_large``), loaders catch it, count it in a
:class:`DataReport` and go on. Unusual but valid modes (CMYK, 16-bit, palette, alpha) are converted
to RGB and counted as ``converted`` so that nothing changes silently.
"""

from __future__ import annotations

import io
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

# 8192^2: bigger than any real photo we train on, far below what a decompression bomb asks for.
DEFAULT_MAX_PIXELS = 8192 * 8192
CROP_MODES = ("center", "random", "pad")


class BadSample(Exception):
    """A sample that must be skipped; ``reason`` is a short machine-readable key."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass
class DataReport:
    """Counts of samples read, kept and skipped (by reason), and of converted images (by kind)."""

    read: int = 0
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)
    converted: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=dict)  # reason -> first offending key (for the message)

    def skip(self, reason: str, key: str = "") -> None:
        """Count one skipped sample under ``reason``, keeping the first offending key."""
        self.skipped[reason] += 1
        self.examples.setdefault(reason, key)

    def merge(self, other: DataReport) -> DataReport:
        """Add another report's counts to this one; returns self."""
        self.read += other.read
        self.kept += other.kept
        self.skipped.update(other.skipped)
        self.converted.update(other.converted)
        for k, v in other.examples.items():
            self.examples.setdefault(k, v)
        return self

    def to_dict(self) -> dict:
        """The report as a JSON-ready dict (counts sorted by reason)."""
        return {"read": self.read, "kept": self.kept, "skipped": dict(sorted(self.skipped.items())),
                "skipped_total": sum(self.skipped.values()), "converted": dict(sorted(self.converted.items())),
                "examples": dict(sorted(self.examples.items()))}

    def summary(self) -> str:
        """One human-readable paragraph, e.g. for the end of a CLI run."""
        lines = [f"read {self.read}, kept {self.kept}, skipped {sum(self.skipped.values())}"]
        for reason, n in sorted(self.skipped.items()):
            lines.append(f"  skipped {reason}: {n} (e.g. {self.examples.get(reason, '?')})")
        for kind, n in sorted(self.converted.items()):
            lines.append(f"  converted {kind}: {n}")
        return "\n".join(lines)


def decode_image(source: bytes | str | Path, *, max_pixels: int = DEFAULT_MAX_PIXELS,
                 report: DataReport | None = None, key: str = "") -> Image.Image:
    """Open an image file or bytes and return it as RGB (alpha composited on white).

    Args:
        source: encoded bytes or a file path.
        max_pixels: images with more pixels are refused *before* decoding (decompression bombs).
        report: where conversions (cmyk, 16bit, palette, alpha, gray) are counted.
        key: name used in error messages.

    Returns:
        A fully loaded RGB PIL image.

    Raises:
        BadSample: reason ``empty``, ``not_image``, ``too_large``, ``truncated`` or ``corrupt``.
    """
    if isinstance(source, (str, Path)):
        try:
            data = Path(source).read_bytes()
        except OSError as e:
            raise BadSample("unreadable", f"{key or source}: {e}") from e
    else:
        data = source
    if len(data) == 0:
        raise BadSample("empty", f"{key}: zero-byte file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadSample("too_large", f"{key}: {e}") from e
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise BadSample("not_image", f"{key}: {e}") from e
    w, h = image.size
    if w * h > max_pixels or w <= 0 or h <= 0:
        raise BadSample("too_large", f"{key}: {w}x{h} exceeds max_pixels={max_pixels}")
    try:
        image.load()
    except OSError as e:
        reason = "truncated" if "truncated" in str(e).lower() else "corrupt"
        raise BadSample(reason, f"{key}: {e}") from e
    except (ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
        raise BadSample("corrupt", f"{key}: {e}") from e
    return to_rgb_counted(image, report)


def to_rgb_counted(image: Image.Image, report: DataReport | None = None) -> Image.Image:
    """Any PIL mode -> RGB; transparent pixels become white; 16-bit is scaled by 1/257 (not per image)."""
    mode = image.mode
    kind = None
    if mode == "RGB":
        out = image
    elif mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in image.info):
        kind = "palette" if mode in ("P", "PA") else "alpha"
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        out = Image.alpha_composite(white, rgba).convert("RGB")
    elif mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        kind = "16bit"
        arr = np.asarray(image, dtype=np.float64)
        # PNG 16-bit gray decodes to I/I;16 with values 0..65535: one fixed scale keeps brightness.
        arr = np.clip(arr / 257.0, 0, 255).round().astype(np.uint8)
        out = Image.fromarray(arr).convert("RGB")
    elif mode == "F":
        kind = "float"
        arr = np.asarray(image, dtype=np.float64)
        scale = 255.0 if arr.max() <= 1.0 else 1.0
        out = Image.fromarray(np.clip(arr * scale, 0, 255).round().astype(np.uint8)).convert("RGB")
    else:
        kind = {"CMYK": "cmyk", "P": "palette", "L": "gray", "1": "gray", "YCbCr": "ycbcr"}.get(mode, mode.lower())
        out = image.convert("RGB")
    if kind is not None and report is not None:
        report.converted[kind] += 1
    return out


def resize_crop(image: Image.Image, size: int, crop: str = "center",
                generator: torch.Generator | None = None,
                background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Resize so the image covers (``center``/``random``) or fits (``pad``) a size x size square.

    Args:
        image: RGB image of any size.
        size: output side in pixels.
        crop: ``center`` crop, ``random`` crop (uses ``generator``), or ``pad`` (whole image, letterboxed).
        generator: randomness for ``random``.
        background: padding colour for ``pad``.

    Returns:
        RGB image of exactly (size, size).
    """
    if crop not in CROP_MODES:
        raise ValueError(f"crop={crop!r} is not allowed; choose one of {list(CROP_MODES)}")
    w, h = image.size
    if crop == "pad":
        scale = size / max(w, h)
        nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
        resized = image.resize((nw, nh), Image.Resampling.LANCZOS, reducing_gap=3.0) if (nw, nh) != (w, h) else image
        canvas = Image.new("RGB", (size, size), background)
        canvas.paste(resized, ((size - nw) // 2, (size - nh) // 2))
        return canvas
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if (nw, nh) != (w, h):
        image = image.resize((nw, nh), Image.Resampling.LANCZOS, reducing_gap=3.0)
    if crop == "random":
        left = int(torch.randint(0, nw - size + 1, (1,), generator=generator)) if nw > size else 0
        top = int(torch.randint(0, nh - size + 1, (1,), generator=generator)) if nh > size else 0
    else:
        left, top = (nw - size) // 2, (nh - size) // 2
    return image.crop((left, top, left + size, top + size))


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float tensor (3, H, W) in [0, 1]."""
    arr = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


def decode_caption(data: bytes, key: str = "") -> str:
    """UTF-8 caption bytes -> stripped str; raises BadSample('caption_not_utf8') naming the file."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise BadSample("caption_not_utf8", f"{key}: {e}") from e
    return " ".join(text.split())
