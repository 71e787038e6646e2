"""cmn-explain end to end: the HTML page, PNG figures, page size, and bad input."""

import json
import re

import numpy as np
import pytest

from cmn.data.demo import render_study, sample_findings
from cmn.explain.cli import main
from cmn.explain.core import Explanation, entities_of
from cmn.explain.html import render_page
from helpers.explain_fixtures import demo_data, demo_views, tiny_bundle


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("explain_cli")
    demo = demo_data(root / "demo")
    return demo, tiny_bundle(root / "ckpt", demo)


def test_html_page_is_self_contained(setup, tmp_path, capsys):
    demo, ckpt = setup
    listing = tmp_path / "studies.txt"
    listing.write_text(" ".join(map(str, demo_views(demo, "test", 1))) + "\n")
    out = tmp_path / "page.html"
    assert (
        main(["--checkpoint", str(ckpt), *map(str, demo_views(demo)), "--list", str(listing), "--output", str(out)])
        == 0
    )
    assert "explained 2 studies" in capsys.readouterr().out
    html = out.read_text(encoding="utf-8")
    assert html.count('<section class="study"') == 2
    # nothing outside the file: every src is a data URI and no URL is fetched
    assert re.findall(r'src="(?!data:image/jpeg;base64,)', html) == []
    assert "http://" not in html and "https://" not in html
    payload = json.loads(re.search(r'<script type="application/json" id="data-0">(.*?)</script>', html).group(1))
    assert payload["grid"] == [2, 2] and payload["views"] == 2 and payload["memory"]["shared"]


def test_png_figures(setup, tmp_path):
    demo, ckpt = setup
    out = tmp_path / "figs"
    assert (
        main(
            [
                "--checkpoint",
                str(ckpt),
                *map(str, demo_views(demo)),
                "--format",
                "png",
                "--max-len",
                "3",
                "--output",
                str(out),
            ]
        )
        == 0
    )
    (study,) = out.iterdir()
    assert (study / "overview.png").is_file()
    words = sorted((study / "words").iterdir())
    assert len(words) == 3 and all(p.suffix == ".png" and p.stat().st_size > 1000 for p in words)


@pytest.mark.parametrize(
    "case",
    [
        "missing folder",
        "output is a folder",
        "output is a file",
        "no checkpoint",
        "missing image",
        "no studies",
        "odd image count",
    ],
)
def test_bad_input_is_one_error_line(setup, tmp_path, capsys, case):
    demo, ckpt = setup
    views = list(map(str, demo_views(demo)))
    out, fmt, ck = tmp_path / "p.html", "html", str(ckpt)
    if case == "missing folder":
        out = tmp_path / "nowhere" / "p.html"
    elif case == "output is a folder":
        out = tmp_path
    elif case == "output is a file":
        out, fmt = tmp_path / "f.txt", "png"
        out.write_text("x")
    elif case == "no checkpoint":
        ck = str(tmp_path / "nockpt")
    elif case == "missing image":
        views[1] = str(tmp_path / "nope.png")
    elif case == "no studies":
        views = []
    elif case == "odd image count":
        views = views[:1]
    assert main(["--checkpoint", ck, *views, "--output", str(out), "--format", fmt]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    assert not (tmp_path / "p.html").exists()


def _iu_sized_explanation(i, frontal, lateral):
    """An explanation with IU X-Ray-sized arrays (60 words, 7 x 7 patches, 3 layers, 8 heads, top-32
    of 2048 slots) and 512 px drawn radiographs."""
    r = np.random.default_rng(i)
    T, Y, V, h, w, H, K, N = 60, 3, 2, 7, 7, 8, 32, 2048
    att = r.random((Y, T, V, h, w)).astype(np.float32)
    att /= att.sum(axis=(2, 3, 4), keepdims=True)

    def selection(n):
        slots = np.argsort(r.random((n, H, N)), axis=-1)[..., :K]
        weights = r.random((n, H, K)).astype(np.float32)
        return slots, weights / weights.sum(-1, keepdims=True)

    ps, pw = selection(V * h * w)
    ws, ww = selection(T)
    words = tuple(
        (
            [
                "there",
                "is",
                "a",
                "small",
                "left",
                "pleural",
                "effusion",
                ".",
                "the",
                "heart",
                "is",
                "mildly",
                "enlarged",
                ".",
            ]
            * 5
        )[:T]
    )
    return Explanation(
        str(i),
        words,
        " ".join(words),
        (frontal, lateral),
        att,
        ps.reshape(V, h, w, H, K),
        pw.reshape(V, h, w, H, K),
        ws,
        ww,
        True,
        np.full(14, np.nan),
        entities_of(words),
    )


def test_a_page_of_100_studies_stays_under_20_mb():
    rng = np.random.default_rng(0)
    frontal, lateral = render_study(sample_findings(rng), 512, rng)
    studies = [_iu_sized_explanation(i, frontal, lateral) for i in range(3)]
    one, three = len(render_page(studies[:1]).encode()), len(render_page(studies).encode())
    per_study = (three - one) / 2  # studies are independent sections: the page grows linearly
    assert one + 99 * per_study < 20e6, f"{per_study / 1e3:.0f} kB per study"


def test_console_script_entries_resolve():
    import importlib
    import subprocess
    import sys
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    for name in ("cmn-explain", "cmn-plot"):
        module, func = re.search(rf'^{name} = "([\w.]+):(\w+)"', text, re.M).groups()
        assert callable(getattr(importlib.import_module(module), func))
    proc = subprocess.run([sys.executable, "-m", "cmn.explain", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "--checkpoint" in proc.stdout
