"""One self-contained HTML page for a list of explanations (``cmn-explain --format html``).

Per study: the downscaled views (JPEG data URIs), the report as clickable words, the labeler's
findings and its finding phrases, and the arrays the page draws from, as compact JSON (maps
quantised to uint8, base64). The page's script (``cmn/viz/assets/explain.js``) draws the
heatmaps on canvases over the images; nothing is fetched, so the file opens from disk.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional

import numpy as np

from cmn.explain.core import Explanation
from cmn.metrics.clinical import CHEXPERT_OBSERVATIONS
from cmn.viz.page import asset, b64_uint8, esc, image_data_uri, json_block, page

LABEL_NAMES = {1.0: ("positive", "lab-pos"), 0.0: ("negative", "lab-neg"), -1.0: ("uncertain", "lab-unc")}
DISPLAY_PX = 256  # CSS width of one view on the page
TOP_SLOTS = 5


def label_name(value: float) -> tuple[str, str]:
    """(word, css class) for a labeler value 1/0/-1/NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "not mentioned", "muted"
    return LABEL_NAMES[float(value)]


def _minmax_uint8(maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(..., P) float -> (..., P) uint8 scaled from each map's min to its max, and the
    (..., 2) float ranges (the reference's plot scales each map the same way)."""
    lo = maps.min(axis=-1, keepdims=True)
    hi = maps.max(axis=-1, keepdims=True)
    scaled = (maps - lo) / np.maximum(hi - lo, 1e-12)
    return np.rint(scaled * 255).astype(np.uint8), np.concatenate([lo, hi], axis=-1)


def _top_slots(slots: np.ndarray, weights: np.ndarray, top: int = TOP_SLOTS) -> list[list[list[float]]]:
    """Per row of (n, H, K) selections, the ``top`` slots by weight summed over heads / H,
    as [[slot, share], ...] (share of the row's whole memory reading)."""
    n, H, K = slots.shape
    dense = np.zeros((n, int(slots.max(initial=0)) + 1))  # (n, N)
    np.add.at(dense, (np.repeat(np.arange(n), H * K), slots.reshape(-1)), weights.reshape(-1) / H)
    best = np.argsort(-dense, axis=1, kind="stable")[:, :top]  # (n, top)
    return [[[int(s), round(float(dense[r, s]), 4)] for s in best[r] if dense[r, s] > 0] for r in range(n)]


def _round(values: np.ndarray, digits: int = 5) -> list:
    return np.round(values.astype(np.float64), digits).tolist()


def study_payload(e: Explanation) -> dict:
    """What the page's script needs for one study (JSON-ready)."""
    Y, T, V, h, w = e.cross_attention.shape
    maps = e.cross_attention.reshape(Y, T, V * h * w)
    maps = np.concatenate([maps, maps.mean(axis=0, keepdims=True)])  # (Y+1, T, V*P): layers, then mean
    att, att_range = _minmax_uint8(maps)
    payload = {
        "words": list(e.words),
        "grid": [h, w],
        "views": V,
        "layers": Y,
        "att": b64_uint8(att),
        "att_range": _round(att_range.reshape(-1)),
        "entities": [
            {"obs": en.observation, "label": en.label, "text": en.text, "words": list(en.words)} for en in e.entities
        ],
        "memory": None,
    }
    if (
        e.word_slots is not None
        and e.patch_slots is not None
        and e.word_slot_weights is not None
        and e.patch_slot_weights is not None
    ):
        H, K = e.patch_slots.shape[-2:]
        memory = {
            "heads": int(H),
            "k": int(K),
            "shared": bool(e.shared_memory),
            "word_top": _top_slots(e.word_slots, e.word_slot_weights),
            "patch_top": _top_slots(e.patch_slots.reshape(-1, H, K), e.patch_slot_weights.reshape(-1, H, K)),
        }
        if e.shared_memory and T:
            ov = e.overlap_matrix().reshape(T, V * h * w)  # (T, V*P) in [0, 1]
            scale = float(max(ov.max(), 1e-12))
            memory["overlap"] = b64_uint8(np.rint(ov / scale * 255))
            memory["overlap_max"] = round(scale, 6)
        payload["memory"] = memory
    return payload


def _study_html(n: int, e: Explanation, files: Optional[Sequence[str]], image_px: int) -> str:
    views = []
    for v, picture in enumerate(e.images):
        uri, width, height = image_data_uri(picture, image_px)
        shown_h = round(DISPLAY_PX * height / width)
        name = ("frontal" if v == 0 else "lateral") if len(e.images) == 2 else f"view {v + 1}"
        views.append(
            f'<figure class="view"><div class="stage" data-view="{v}" style="width:{DISPLAY_PX}px;height:{shown_h}px">'
            f'<img src="{uri}" width="{DISPLAY_PX}" height="{shown_h}" alt="{esc(name)} view of study {esc(e.study_id)}">'
            f'<canvas class="heat" width="{DISPLAY_PX}" height="{shown_h}"></canvas></div>'
            f"<figcaption>{esc(name)}</figcaption></figure>"
        )
    words = " ".join(f'<span class="w" tabindex="0" data-i="{i}">{esc(w)}</span>' for i, w in enumerate(e.words))
    chips = (
        "".join(
            f'<button type="button" class="chip {label_name(en.label)[1]}" data-entity="{k}" '
            f'title="{esc(en.observation)}: {label_name(en.label)[0]}">{esc(en.text)}</button>'
            for k, en in enumerate(e.entities)
        )
        or '<span class="muted">no finding phrases</span>'
    )
    rows = []
    for name, value in zip(CHEXPERT_OBSERVATIONS, e.labels.tolist()):
        word, css = label_name(value)
        if css != "muted":
            rows.append(f'<tr><td>{esc(name)}</td><td class="{css}">{word}</td></tr>')
    labels = "".join(rows) or '<tr><td class="muted" colspan="2">nothing mentioned</td></tr>'
    layer_options = '<option value="mean">mean of layers</option>' + "".join(
        f'<option value="{i}">layer {i + 1}</option>' for i in range(e.cross_attention.shape[0])
    )
    memory_choice = (
        '<label><input type="radio" name="mode-{n}" value="memory"> memory overlap</label>'
        if e.shared_memory and e.word_slots is not None
        else ""
    )
    source = f' <span class="muted">{esc(" · ".join(files))}</span>' if files else ""
    return (
        f'<section class="study" id="study-{n}" data-study="{n}">\n'
        f'<h2>{esc(e.study_id)}{source}</h2>\n<div class="row">\n<div class="left">\n'
        f'<div class="views">{"".join(views)}</div>\n'
        f'<div class="controls"><label><input type="radio" name="mode-{n}" value="attention" checked> '
        f"decoder attention</label>{memory_choice.format(n=n)}"
        f'<select class="layer" aria-label="layer">{layer_options}</select></div>\n'
        f'<div class="status" aria-live="polite"></div>\n'
        f'</div>\n<div class="right">\n<div class="report">{words or "<span class=muted>(empty report)</span>"}</div>\n'
        f'<div class="entities"><span class="muted">finding phrases:</span> {chips}</div>\n'
        f'<div class="memory muted"></div>\n'
        f'<table class="labels"><tr><th>labeler finding</th><th>label</th></tr>{labels}</table>\n'
        f"</div>\n</div>\n{json_block(f'data-{n}', study_payload(e))}\n</section>"
    )


HELP = """<details class="help"><summary>How to read this page</summary>
<p>Each study shows its views and the report the model wrote. Hover over a word to see where the
decoder looked while writing it (the cross-attention of that step over the image patches, heads
averaged, per layer or averaged over layers); click a word to keep it. Each map is scaled from its
smallest to its largest value, so always check the range printed under the images: a narrow range
means the word looked almost everywhere alike.</p>
<p><b>Memory overlap</b> (the shared memory of the paper): each image patch and each word reads the
top-K slots of the memory matrix per head. The map shows, for the chosen word, how much of each
patch's reading is the same as the word's (shared weight over the same slots, averaged over heads;
1 = identical reading). Click an image region to list the slots it reads and to shade the words by
how much they share with it.</p>
<p><b>Finding phrases</b> are the words the built-in labeler read as a CheXpert observation; clicking
one averages the maps of its words. Colours: <span class="lab-pos">positive</span>,
<span class="lab-neg">negative</span>, <span class="lab-unc">uncertain</span>.</p></details>"""


def render_page(
    explanations: Sequence[Explanation],
    *,
    files: Optional[Sequence[Sequence[str]]] = None,
    title: str = "cmn explanations",
    subtitle: str = "",
    image_px: int = 320,
) -> str:
    """The whole page as a string; ``files`` names each study's images (shown under its id);
    ``image_px`` caps the longer side of each inlined image."""
    sections = [_study_html(n, e, files[n] if files else None, image_px) for n, e in enumerate(explanations)]
    body = f'<h1>{esc(title)}</h1>\n<p class="muted">{esc(subtitle)}</p>\n{HELP}\n' + "\n".join(sections)
    return page(title, body, css=asset("explain.css"), script=asset("explain.js"))
