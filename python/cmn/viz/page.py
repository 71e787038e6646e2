"""Self-contained HTML pages: one file, images inlined as data URIs, no network, no libraries.

Shared by ``cmn-explain`` and ``cmn-eval --html``: the page shell, escaping, inlined images and
data blocks. Scripts and styles live beside this module (``assets/``) and are inlined.
"""

from __future__ import annotations

import base64
import html
import io
import json
from importlib import resources
from typing import Any

import numpy as np
from PIL import Image


def esc(text: Any) -> str:
    """Text for HTML content and attribute values."""
    return html.escape(str(text), quote=True)


def asset(name: str) -> str:
    return resources.files("cmn.viz").joinpath("assets").joinpath(name).read_text(encoding="utf-8")


def image_data_uri(image: np.ndarray, max_px: int, quality: int = 85) -> tuple[str, int, int]:
    """uint8 (rows, cols) or (rows, cols, 3) -> (JPEG data URI, width, height), the longer
    side scaled down to ``max_px`` (never up); grayscale stays one channel."""
    arr = np.asarray(image, dtype=np.uint8)
    if arr.ndim == 3 and arr.shape[2] == 3 and (arr == arr[..., :1]).all():
        arr = arr[..., 0]  # a gray picture stored as RGB: one channel is a third of the bytes
    pic = Image.fromarray(arr)
    scale = min(1.0, max_px / max(pic.size))
    if scale < 1.0:
        pic = pic.resize(
            (max(1, round(pic.width * scale)), max(1, round(pic.height * scale))), Image.Resampling.LANCZOS
        )
    buf = io.BytesIO()
    pic.save(buf, format="JPEG", quality=quality, optimize=True)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii"), pic.width, pic.height


def b64_uint8(values: np.ndarray) -> str:
    """A uint8 array's bytes as base64 (read back in the page with ``atob``)."""
    return base64.b64encode(np.ascontiguousarray(values, dtype=np.uint8).tobytes()).decode("ascii")


def json_block(element_id: str, payload: Any) -> str:
    """A ``<script type="application/json">`` block; ``</`` is escaped so text cannot end it."""
    text = json.dumps(payload, separators=(",", ":"), allow_nan=False).replace("</", "<\\/")
    return f'<script type="application/json" id="{esc(element_id)}">{text}</script>'


def page(title: str, body: str, *, css: str = "", script: str = "") -> str:
    """A complete HTML document: the shared style, then ``css``, ``body`` and ``script``."""
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        # Nothing is loaded from anywhere: the page must open from disk, offline.
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; '
        "img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'\">\n"
        f"<title>{esc(title)}</title>\n<style>\n{asset('base.css')}\n{css}\n</style>\n</head>\n"
        f"<body>\n{body}\n<script>\n{script}\n</script>\n</body>\n</html>\n"
    )
