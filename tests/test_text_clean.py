"""Report cleaning: native (Rust) output must equal the reference behaviour exactly.

:mod:`cmn.text_ref` restates the reference (R2GenCMN) cleaning in plain Python; the
golden tests below pin each of its quirks with literal expected strings.
"""

import os
import platform
import sys
import unicodedata
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cmn import _native
from cmn.errors import DataError
from cmn.text import clean_report, clean_reports
from cmn.text_ref import clean_report as ref_clean

DATASETS = ("iu_xray", "mimic_cxr")


def both(text):
    return {ds: clean_report(text, ds) for ds in DATASETS}


# -- golden tests: one per quirk of the reference -------------------------------------


def test_golden_plain_report():
    assert clean_report("The lungs are clear. No effusion.", "mimic_cxr") == "the lungs are clear . no effusion ."


def test_golden_quirk_colon_to_bracket_range_deletes_comparison_signs():
    # `:-\[` is a range: ':' ';' '<' '=' '>' '?' '@' 'A'-'Z' '[' are deleted, '-' is kept.
    assert both("a<b=c>d@e?f;g:h[i]j") == {ds: "abcdefghij ." for ds in DATASETS}
    assert both("well-defined") == {ds: "well-defined ." for ds in DATASETS}
    assert clean_report("size <= 5 mm", "mimic_cxr") == "size  5 mm ."


def test_golden_quirk_empty_sentences_are_never_filtered():
    assert both(". . .") == {ds: " .  .  ." for ds in DATASETS}
    assert both("") == {ds: " ." for ds in DATASETS}
    assert both("!!!") == {ds: " ." for ds in DATASETS}


def test_golden_quirk_one_dot_space_is_deleted_anywhere():
    assert clean_report("see 11. nodes", "mimic_cxr") == "see 1nodes ."
    assert clean_report("1. clear. 2. normal", "iu_xray") == "clear . normal ."
    assert clean_report("clear 3. normal 6. end", "iu_xray") == "clear . normal 6 . end ."


def test_golden_quirk_mimic_only_rewrites_newlines_underscores_and_spaces():
    assert both("___ noted\nhere") == {"iu_xray": " noted\nhere .", "mimic_cxr": " noted here ."}
    assert both("a  b") == {"iu_xray": "a  b .", "mimic_cxr": "a b ."}


def test_golden_deidentification_markers():
    report = "Dr. ___ was paged at ___ on ___. Findings discussed."
    assert clean_report(report, "mimic_cxr") == "dr .  was paged at  on  . findings discussed ."


def test_golden_quotes_slashes_and_braces():
    assert clean_report('"Left" side/base {stable} \\ it\'s', "iu_xray") == "left sidebase stable  its ."


def test_golden_python_whitespace_and_lowercase():
    # U+001C is whitespace for Python's strip(), not for Rust's trim().
    assert clean_report("\x1cClear\x1c", "iu_xray") == "clear ."
    assert clean_report("İ ΟΔΟΣ. ΟΔΟΣΑ", "iu_xray") == "i\u0307 οδος . οδοσα ."


# -- exhaustive checks of the Python string semantics ---------------------------------


def test_lowercase_matches_python_for_every_code_point():
    chars = [chr(c) for c in range(sys.maxunicode + 1) if not 0xD800 <= c < 0xE000]
    text = "".join(chars)
    assert _native._py_lower(text) == text.lower()


def test_whitespace_and_punctuation_match_python_for_the_bmp_start():
    for code in range(0x3100):
        if 0xD800 <= code < 0xE000:
            continue
        text = f"A{chr(code)}b. C {chr(code)}"
        for ds in DATASETS:
            assert clean_report(text, ds) == ref_clean(text, ds), hex(code)


# -- property tests against the reference ---------------------------------------------

FRAGMENTS = [
    "1. ",
    ". 2. ",
    " 3. ",
    " 4. ",
    ". 5. ",
    "11. ",
    "___",
    "__",
    "_",
    "..",
    "...",
    ". ",
    "  ",
    "\n",
    "\t",
    "\x1c",
    "\xa0",
    "\u2028",
    "\x00",
    "\x7f",
    "\x0b",
    "(",
    ")",
    "[",
    "]",
    "{",
    "}",
    ":",
    "<",
    ">",
    "=",
    "@",
    "-",
    "'",
    '"',
    "/",
    "\\",
    "?",
    "!",
    "%",
    "^",
    "&",
    "*",
    "+",
    ",",
    ";",
    "İ",
    "Σ",
    "ß",
    "é",
    "ﬁ",
    "Ⅻ",
    "\u0301",
    "The",
    "lungs",
    "are",
    "clear",
    "No",
    "pleural",
    "effusion",
    "PA",
    "AP",
    "CHF",
    "x",
    "2cm",
]
known_text = st.text(st.characters(blacklist_categories=("Cs", "Cn")), max_size=200)
fragment_text = st.lists(st.sampled_from(FRAGMENTS), max_size=60).map("".join)
numbered = st.lists(st.tuples(st.integers(1, 12), fragment_text), max_size=8).map(
    lambda items: " ".join(f"{n}. {s}." for n, s in items)
)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=st.one_of(known_text, fragment_text, numbered), dataset=st.sampled_from(DATASETS))
def test_matches_reference_on_random_and_adversarial_text(text, dataset):
    assert clean_report(text, dataset) == ref_clean(text, dataset)


@settings(max_examples=20, deadline=None)
@given(text=fragment_text)
def test_matches_reference_on_very_long_text(text):
    long = (text + " Heart size normal. ") * 500
    for ds in DATASETS:
        assert clean_report(long, ds) == ref_clean(long, ds)


# -- Unicode: the running interpreter's tables, final sigma included ------------------
#
# Python lowers every character on its own except the capital sigma, which becomes final
# (ς) when the nearest character before it that is not case-ignorable is cased and the
# nearest one after it is not. So lowering is fixed by two facts per character, its
# lowercase and its role (cased / case-ignorable / neither), and the cleaner equals
# Python on EVERY string once it equals Python on these contexts for every character:
# c right before a sigma, with and without a cased letter beyond it, and c right after
# one, again with and without. The test below checks all of them for all of Unicode.

SIGMA_CONTEXTS = ("{c}Σ", "A{c}Σ", "AΣ{c}", "AΣ{c}A")
ALL_CHARS = [chr(c) for c in range(sys.maxunicode + 1) if not 0xD800 <= c < 0xE000 and c != 0x0A]


@pytest.mark.parametrize("context", SIGMA_CONTEXTS)
def test_final_sigma_matches_python_next_to_every_code_point(context):
    text = "\n".join(context.format(c=c) for c in ALL_CHARS)
    got = _native._py_lower(text)
    if got != text.lower():
        bad = [c for c in ALL_CHARS if _native._py_lower(context.format(c=c)) != context.format(c=c).lower()]
        pytest.fail(f"{len(bad)} characters differ, e.g. {[f'U+{ord(c):04X}' for c in bad[:8]]}")


def test_cleaning_matches_the_reference_next_to_every_code_point():
    text = "\n".join(f"A{c}Σ {c}Σ" for c in ALL_CHARS)
    assert clean_report(text, "iu_xray") == ref_clean(text, "iu_xray")


def _sigma_roles(chars):
    """This interpreter's cased and case-ignorable characters among ``chars``, told by
    its own ``str.lower`` (Python has no other way to ask)."""
    rows = "".join(f"{c}Σ\nA{c}Σ\n" for c in chars).lower().split("\n")
    cased, ignorable = [], []
    for c, plain, after_cased in zip(chars, rows[0::2], rows[1::2]):
        if after_cased.endswith("ς"):
            (cased if plain.endswith("ς") else ignorable).append(c)
    return cased, ignorable


_NEAR = [chr(c) for c in [*range(0x20000), *range(0xE0000, 0xE01F0)] if not 0xD800 <= c < 0xE000 and c != 0x0A]
CASED, IGNORABLE = _sigma_roles(_NEAR)
# Unassigned here, so lowered and classified by Rust's newer tables unless the cleaner
# follows this interpreter.
UNASSIGNED = [c for c in _NEAR if unicodedata.category(c) == "Cn"]
NAMED = [
    "ΟΣʕ",
    "ΑΣ\ua7cb",
    "\ua7cbΣ",
    "ΑΣ\u1c89",
    "ΑΣ\U00010d50",
    "ΑΣ\U00016ea0",
    "Α\u0345Σ",
    "ΑΣ\u0345",
    "Α'Σ'",
    "Α.Σ.Α",
    "ʕΣ",
    "ʕ'Σ",
    "Σʕ",
    "ΑΣʕΣ",
    "ΌΣΟΣ. ΣΟΦΟΣ",
    "ΑΣ\u00ad",
    "Α\u00adΣ\u00adΑ",
]
sigma_text = st.lists(
    st.one_of(
        st.just("Σ"),
        st.sampled_from(CASED),
        st.sampled_from(IGNORABLE),
        st.sampled_from(UNASSIGNED),
        st.sampled_from(["σ", "ς", " ", ".", ". ", "'", "A", "a", "\n", "ʕ", "\u0345"]),
    ),
    max_size=24,
).map("".join)


@pytest.mark.parametrize("text", NAMED)
def test_named_final_sigma_cases(text):
    assert _native._py_lower(text) == text.lower()
    for ds in DATASETS:
        assert clean_report(text, ds) == ref_clean(text, ds)


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=sigma_text, dataset=st.sampled_from(DATASETS))
def test_matches_reference_around_sigma_and_case_ignorable_characters(text, dataset):
    assert _native._py_lower(text) == text.lower()
    assert clean_report(text, dataset) == ref_clean(text, dataset)


# -- batch, bytes and bad input --------------------------------------------------------


def test_clean_reports_matches_one_by_one():
    texts = ["A. B", "", "1. x. 2. y", "___ z\n"] * 50
    for ds in DATASETS:
        assert clean_reports(texts, ds) == [ref_clean(t, ds) for t in texts]
    assert clean_reports(iter(["A"]), "iu_xray") == ["a ."]


def test_utf8_bytes_are_accepted():
    assert clean_report("Opacité. Normal".encode(), "iu_xray") == ref_clean("Opacité. Normal", "iu_xray")


@pytest.mark.parametrize(
    "bad, message",
    [
        ("ok \udcff", "lone surrogate"),
        (b"ok \xff", "not valid UTF-8: invalid byte at offset 3"),
        (42, "must be str or bytes"),
    ],
)
def test_bad_text_is_a_data_error(bad, message):
    with pytest.raises(DataError, match=message):
        clean_report(bad, "mimic_cxr")
    with pytest.raises(DataError, match="report 1"):
        clean_reports(["fine", bad], "mimic_cxr")


@pytest.mark.parametrize("one", ["a str. Another", b"bytes", bytearray(b"x")])
def test_one_report_where_a_list_belongs_is_a_type_error(one):
    # iterating it would clean each character (or byte) as a report
    with pytest.raises(TypeError, match=f"texts must be a list of reports, not a single {type(one).__name__}"):
        clean_reports(one, "iu_xray")
    with pytest.raises(TypeError, match="not a single"):
        _native.clean_reports(one, "iu_xray")


def test_unknown_dataset_is_a_data_error():
    with pytest.raises(DataError, match="unknown dataset 'chexpert'|unknown dataset \"chexpert\""):
        clean_report("x", "chexpert")


def _other_interpreters() -> list[str]:
    """Python 3.9+ interpreters on this machine other than the running one (PATH and pyenv)."""
    import glob
    import shutil
    import subprocess

    found = {}
    candidates = [shutil.which(f"python3.{m}") for m in range(9, 15)]
    candidates += sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.*/bin/python3")))
    for exe in filter(None, candidates):
        try:
            out = subprocess.run(
                [exe, "-c", "import sys; print(sys.version_info[:2] >= (3, 9), sys.version.split()[0])"],
                capture_output=True,
                text=True,
                timeout=30,
            )
        except (OSError, subprocess.TimeoutExpired):
            continue
        ok, _, version = out.stdout.strip().partition(" ")
        if out.returncode == 0 and ok == "True" and version != platform.python_version():
            found.setdefault(version, exe)
    return sorted(found.values())


@pytest.mark.slow
def test_lowercase_matches_every_python_on_this_machine():
    """The case table comes from the running interpreter, so the cleaner matches the reference
    on each Python version it runs on (Unicode data differs between them: 13.0 on 3.9/3.10,
    15.x on 3.12/3.13). The abi3 module is loaded by each interpreter found here; the running
    one is checked by the test above."""
    import subprocess

    package = Path(_native.__file__).resolve().parents[1]
    script = (
        "import sys; sys.path.insert(0, sys.argv[1]); from cmn import _native\n"
        "chars = ''.join(chr(c) for c in range(0x110000) if not 0xD800 <= c < 0xE000)\n"
        "text = chars + ' ΣΑΣ ΣΑΣ. ὈΔΥΣΣΕΎΣ'\n"
        "assert _native._py_lower(text) == text.lower()\n"
    )
    checked: list[str] = []
    for exe in [sys.executable, *_other_interpreters()]:
        out = subprocess.run([exe, "-c", script, str(package)], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, f"{exe}: {out.stderr[-2000:]}"
        checked.append(exe)
    print(f"lowercasing checked on {platform.python_version()} and {checked}")
