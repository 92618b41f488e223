"""Cheap checks that keep the house style true (STYLE.md 2.9) for every method script present."""
import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["m2snet", "reseg_unet", "cmssm_unet", "mfel", "dinet"]
PRESENT = [m for m in METHODS if (ROOT / f"{m}.py").exists()]
NOTEBOOKS = [m for m in PRESENT if (ROOT / "notebooks" / f"{m}.ipynb").exists()]


def test_layout_has_only_the_designed_top_level_entries():
    allowed = {"README.md", "requirements.txt", "requirements-dev.txt", "common.py", "notebooks",
               "tests", "LICENSE", *[f"{m}.py" for m in METHODS]}
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if tracked.returncode != 0 or not tracked.stdout:  # not a git checkout: look at the folder
        names = {p.name for p in ROOT.iterdir()}
    else:
        names = {line.split("/")[0] for line in tracked.stdout.splitlines()}
    stray = {n for n in names if not n.startswith(".")} - allowed
    assert not stray, f"top-level entries outside DESIGN.md's layout: {sorted(stray)}"


def test_common_functions_have_docstrings():
    tree = ast.parse((ROOT / "common.py").read_text())
    missing = [node.name for node in ast.walk(tree)
               if isinstance(node, (ast.FunctionDef, ast.ClassDef))
               and not node.name.startswith("_") and ast.get_docstring(node) is None
               and not node.name.startswith(("forward", "backward"))]
    assert not missing, f"common.py definitions without a docstring: {missing}"


@pytest.mark.parametrize("method", PRESENT)
def test_equation_map_matches_inline_tags(method):
    source = (ROOT / f"{method}.py").read_text()
    docstring = ast.get_docstring(ast.parse(source))
    mapped = {int(n) for n in re.findall(r"Eq\. \((\d+)\)[^\n]*->", docstring)}
    body = source.split('"""', 2)[2]
    tagged = {int(n) for n in re.findall(r"#[^\n]*?Eq\. \((\d+)\)", body)}
    assert mapped, f"{method}.py: no 'Eq. (n) -> ...' lines in the docstring's equation map"
    assert mapped == tagged, (f"{method}.py: map only {sorted(mapped - tagged)}, "
                              f"tags only {sorted(tagged - mapped)}")


@pytest.mark.parametrize("method", PRESENT)
def test_script_shape(method):
    source = (ROOT / f"{method}.py").read_text()
    fences = re.findall(r"^# ==== (\d+)\. ", source, re.MULTILINE)
    assert len(fences) >= 6, f"{method}.py: expected the numbered '# ==== n. ... ====' sections"
    assert 'if __name__ == "__main__":' in source and "common.cli(main)" in source
    assert max(len(line) for line in source.splitlines()) <= 100
    tree = ast.parse(source)
    names = {node.name for node in tree.body if isinstance(node, (ast.FunctionDef,
                                                                 ast.ClassDef))}
    assert {"build_model", "train_one_epoch", "evaluate", "main"} <= names


@pytest.mark.parametrize("method", NOTEBOOKS)
def test_notebook_opening_and_size(method):
    path = ROOT / "notebooks" / f"{method}.ipynb"
    assert path.stat().st_size < 1_000_000
    cells = json.loads(path.read_text())["cells"]
    assert cells[0]["cell_type"] == "markdown"
    opening = "".join(cells[0]["source"])
    assert "colab.research.google.com" in opening and f"{method}.py" in opening
    assert cells[1]["cell_type"] == "code" and "colab" in "".join(cells[1]["source"]).lower()
    parameters = [c for c in cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(parameters) == 1 and "FAST" in "".join(parameters[0]["source"])
    assert any(f"import {method} as m" in "".join(c["source"]) for c in cells)
    source = (ROOT / f"{method}.py").read_text()
    equations = set(re.findall(r"Eq\. \((\d+)\)", source))
    text = "".join("".join(c["source"]) for c in cells)
    shown = set(re.findall(r"(?:Eq\.|\\quad|\\tag\{?) ?\(?(\d+)\)?", text))
    assert equations <= shown, f"equations missing from the notebook: {equations - shown}"


@pytest.mark.parametrize("method", PRESENT)
def test_threads_are_set_once_the_same_way(method):
    # common.py's docstring ("Threads") says why; every script does it before importing torch.
    source = (ROOT / f"{method}.py").read_text()
    line = 'os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")'
    assert line in source, f"{method}.py does not set OMP_WAIT_POLICY"
    assert source.index(line) < source.index("import torch"), f"{method}.py: set it before torch"
    assert "MAX_IMAGE_PIXELS" not in source + (ROOT / "common.py").read_text()


@pytest.mark.parametrize("method", PRESENT)
def test_script_and_main_stay_short(method):
    source = (ROOT / f"{method}.py").read_text()
    assert len(source.splitlines()) <= 900, f"{method}.py is over 900 lines"
    main = next(node for node in ast.parse(source).body
                if isinstance(node, ast.FunctionDef) and node.name == "main")
    assert main.end_lineno - main.lineno + 1 <= 70, f"{method}.py: main() is over 70 lines"
