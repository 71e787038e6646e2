"""Import boundaries: the library layers never reach up into the commands that use them."""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "python" / "cmn"
LOWER = ("model", "ops", "data", "metrics")
# modules of the top layer: command lines, training and inference orchestration
UPPER = {
    "cmn.cli",
    "cmn.cliutil",
    "cmn.train",
    "cmn.warmup",
    "cmn.engine",
    "cmn.inference",
    "cmn.compare",
    "cmn.explain",
    "cmn.convert",
    "cmn.prepare",
    "cmn.viz",
    "cmn.metrics.cli",
}


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


@pytest.mark.parametrize("layer", LOWER)
def test_lower_layers_do_not_import_commands(layer):
    offenders = []
    for path in sorted((PKG / layer).rglob("*.py")):
        if path.relative_to(PKG).as_posix() == "metrics/cli.py":  # the cmn-eval/cmn-label command itself
            continue
        for name in imported_modules(path):
            if any(name == u or name.startswith(u + ".") for u in UPPER):
                offenders.append(f"{path.relative_to(PKG)} imports {name}")
    assert not offenders, "\n".join(offenders)
