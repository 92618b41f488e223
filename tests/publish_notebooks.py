"""Stamp the five notebooks for publishing: one setup cell, identical in all of them, and the Colab
badge of each first cell, both pointing at one repository address and revision.

    python tests/publish_notebooks.py --repo https://github.com/OWNER/REPO --rev main
    python tests/publish_notebooks.py           # re-stamp with the address already stamped
    python tests/publish_notebooks.py --check   # exit 1 unless every notebook is stamped alike

Stamping replaces the first code cell of every `notebooks/*.ipynb` by SETUP_CELL (with the two
constants at its top set) and clears its outputs. Run it after executing the notebooks, so that
no local path printed by the setup cell is published. Names the old first cell imported and a
later cell still uses (say `json`) are moved into the first later cell that imports something,
so a notebook written against another setup cell keeps running; a plain variable of the old cell
that a later cell uses cannot be moved and stops the stamping with its name.
"""
import argparse
import ast
import io
import re
import sys
import tokenize
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
PLACEHOLDER = "https://github.com/OWNER/REPO"
DEFAULT_REV = "main"

# The canonical setup cell. Only the values of REPO and REV change when it is stamped.
SETUP_CELL = '''\
# Setup, the same in all five notebooks: use the repository's scripts where they already are, else
# clone them; install only what is missing; print the versions. tests/publish_notebooks.py sets:
REPO = "https://github.com/OWNER/REPO"  # the address to clone from
REV = "main"                            # the branch, tag or commit to check out
import importlib.util, os, platform, shutil, subprocess, sys
os.environ["NO_PROGRESS"] = "1"                      # no progress bars in the notebook
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: no spinning on shared CPUs
git = lambda *args: subprocess.run(["git", *args], capture_output=True, text=True,
                                   env={**os.environ, "GIT_TERMINAL_PROMPT": "0"})

# The scripts may be in the working folder (also after an upload), its parent (the notebook opened
# from notebooks/), or the clone made by an earlier run of this cell.
clone = os.path.abspath(os.path.basename(REPO.rstrip("/")).removesuffix(".git"))
places = [os.getcwd(), os.path.dirname(os.getcwd()), clone]
ROOT = next((p for p in places if os.path.isfile(os.path.join(p, "common.py"))), None)
if ROOT is None:
    instead = ("or upload common.py and this notebook's script (such as m2snet.py) with `from "
               "google.colab import files; files.upload()` (or mount Drive: `from google.colab "
               "import drive; drive.mount('/content/drive')`, then `%cd` to their folder), and "
               "re-run this cell")
    if "OWNER/REPO" in REPO:
        raise RuntimeError(f"No repository address is set: set REPO at the top of this cell, "
                           f"{instead}.")
    done, problem = git("clone", "--quiet", REPO, clone), f"could not clone {REPO}"
    if done.returncode == 0:
        done = git("-C", clone, "checkout", "--quiet", REV)  # a branch, a tag or a commit hash
        problem = f"{REPO} has no revision {REV!r}"
        if done.returncode != 0:
            shutil.rmtree(clone)  # no half-made clone for the next run to trust
    if done.returncode != 0:
        why = next((line for line in done.stderr.splitlines()
                    if line.startswith(("fatal:", "error:"))), "git gave no reason")
        raise RuntimeError(f"The scripts are not here and {problem} ({why}): check REPO and REV "
                           f"at the top of this cell, {instead}.")
    ROOT = clone
os.chdir(ROOT)  # the cells below read and write relative to the repository root
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# requirements.txt (and matplotlib): Colab has all of them; elsewhere the missing ones are
# installed, never torch (a plain `pip install torch` may pull a multi-GB build: see the README).
needs = {"numpy": "numpy", "scipy": "scipy", "PIL": "pillow", "tqdm": "tqdm", "h5py": "h5py",
         "matplotlib": "matplotlib"}  # module: pip package
missing = [package for module, package in needs.items() if importlib.util.find_spec(module) is None]
if missing:
    print("installing", *missing)
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", *missing], check=True)
import matplotlib, numpy as np, torch
import matplotlib.pyplot as plt
in_git = os.path.exists(os.path.join(ROOT, ".git"))  # a clone or a checkout, not an upload
commit = git("-C", ROOT, "rev-parse", "--short", "HEAD").stdout.strip() if in_git else "-"
device = "cuda" if torch.cuda.is_available() else "cpu"
print(f"scripts: {ROOT}, commit {commit}")
print(f"python {platform.python_version()}, torch {torch.__version__}, numpy {np.__version__}, "
      f"matplotlib {matplotlib.__version__}, device {device}")'''

CONSTANT = r'^({name} = )"[^"\n]*"'  # the literal of REPO or REV on its line of SETUP_CELL
BADGE_IMAGE = "https://colab.research.google.com/assets/colab-badge.svg"
# A Colab badge as markdown or as HTML, whatever address and revision it points to.
BADGE = re.compile(r'\[!\[[^\]]*\]\([^)]*colab-badge\.svg\)\]\(https://colab\.research\.google'
                   r'\.com/[^)]*\)|<a href="https://colab\.research\.google\.com/[^"]*">.*?</a>',
                   re.DOTALL)
GITHUB = re.compile(r"https://github\.com/([\w.-]+)/([\w.-]+?)(?:\.git)?/?")


def setup_cell(repo, rev):
    """SETUP_CELL with REPO and REV set (both written as plain double-quoted literals)."""
    for name, value in (("REPO", repo), ("REV", rev)):
        if not value or re.search(r'["\\\s]', value):
            raise ValueError(f"{name} {value!r}: give it without spaces, quotes or backslashes")
    source = re.sub(CONSTANT.format(name="REPO"), lambda m: f'{m[1]}"{repo}"', SETUP_CELL,
                    count=1, flags=re.MULTILINE)
    return re.sub(CONSTANT.format(name="REV"), lambda m: f'{m[1]}"{rev}"', source, count=1,
                  flags=re.MULTILINE)


def stamped_values(source):
    """(REPO, REV) of a setup cell written by setup_cell, else None."""
    values = [re.search(CONSTANT.format(name=name), source, re.MULTILINE) for name in ("REPO",
                                                                                      "REV")]
    if not all(values):
        return None
    return tuple(ast.literal_eval(v[0].split(" = ", 1)[1]) for v in values)


def badge(repo, rev, name):
    """The Colab badge of notebooks/<name> (a file name) at `rev` of the GitHub repository."""
    match = GITHUB.fullmatch(repo)
    if match is None:
        raise ValueError(f"--repo {repo}: Colab opens notebooks from GitHub only; give "
                         f"https://github.com/OWNER/REPO")
    owner, project = match.groups()
    link = f"https://colab.research.google.com/github/{owner}/{project}/blob/{rev}/notebooks/{name}"
    return f"[![Open In Colab]({BADGE_IMAGE})]({link})"


def _code(source):
    """Python source of a cell with IPython's `!shell` and `%magic` lines blanked out."""
    return re.sub(r"^(\s*)[!%].*$", r"\1pass", source, flags=re.MULTILINE)


def _bindings(source):
    """{name: how it is bound} for the top-level imports and assignments of a cell."""
    bound = {}
    for node in ast.parse(_code(source)).body:
        if isinstance(node, ast.Import):
            for alias in node.names:
                statement = f"import {alias.name}" + (f" as {alias.asname}" if alias.asname else "")
                bound[alias.asname or alias.name.split(".")[0]] = statement
        elif isinstance(node, ast.ImportFrom):
            for alias in node.names:
                statement = f"from {'.' * node.level}{node.module or ''} import {alias.name}"
                bound[alias.asname or alias.name] = statement + (f" as {alias.asname}"
                                                                 if alias.asname else "")
        else:
            for target in ast.walk(node):
                if isinstance(target, ast.Name) and isinstance(target.ctx, ast.Store):
                    bound.setdefault(target.id, None)  # a variable: nothing to re-import
    return bound


def _names_used(sources):
    """Every identifier token in the given cells' code."""
    names = set()
    for source in sources:
        tokens = tokenize.generate_tokens(io.StringIO(_code(source) + "\n").readline)
        try:
            names |= {t.string for t in tokens if t.type == tokenize.NAME}
        except (tokenize.TokenError, SyntaxError):
            names |= set(re.findall(r"[A-Za-z_]\w*", source))
    return names


def stamp(notebook, name, repo, rev, with_badge=True):
    """Stamp one notebook in place; returns the notes worth printing (imports moved)."""
    codes = [cell for cell in notebook.cells if cell.cell_type == "code"]
    if not codes:
        raise ValueError(f"{name}: no code cell to turn into the setup cell")
    first, later = codes[0], codes[1:]
    new = setup_cell(repo, rev)
    kept = _bindings(new)
    used = _names_used(cell.source for cell in later)
    lost = {n: how for n, how in _bindings(first.source).items() if n in used and n not in kept}
    stranded = sorted(n for n, how in lost.items() if how is None)
    if stranded:
        raise ValueError(f"{name}: later cells use {', '.join(stranded)} from the old setup cell; "
                         f"define it in a later cell first")
    notes = []
    if lost:
        home = next((c for c in later if any(isinstance(n, (ast.Import, ast.ImportFrom))
                                             for n in ast.parse(_code(c.source)).body)), later[0])
        plain = sorted(n for n, how in lost.items() if how == f"import {n}")
        lines = ([f"import {', '.join(plain)}"] if plain else []) + sorted(
            how for n, how in lost.items() if n not in plain)
        home.source = "\n".join(lines) + "\n" + home.source
        notes.append(f"{name}: moved from the old setup cell: {'; '.join(lines)}")
    first.source, first.outputs, first.execution_count = new, [], None
    first.metadata.pop("execution", None)  # the timings of the run whose outputs are cleared
    if with_badge:
        _stamp_badge(notebook, name, badge(repo, rev, name))
    return notes


def _stamp_badge(notebook, name, new_badge):
    """Replace the first markdown cell's badge (or add one after the title and citation)."""
    cell = next((c for c in notebook.cells if c.cell_type == "markdown"), None)
    if cell is None:
        raise ValueError(f"{name}: no markdown cell to hold the Colab badge")
    if BADGE.search(cell.source):
        cell.source = BADGE.sub(lambda _: new_badge, cell.source, count=1)
    else:
        paragraphs = cell.source.split("\n\n")
        cell.source = "\n\n".join(paragraphs[:2] + [new_badge] + paragraphs[2:])


def notebook_paths(folder=ROOT / "notebooks"):
    """The notebooks to stamp, in a fixed order."""
    return sorted(Path(folder).glob("*.ipynb"))


def problems(paths):
    """What --check reports: every first code cell must be SETUP_CELL with the same REPO and REV,
    and every badge must point at that address and revision."""
    found, stamps = [], set()
    for path in paths:
        notebook = nbformat.read(path, as_version=4)
        codes = [c for c in notebook.cells if c.cell_type == "code"]
        values = stamped_values(codes[0].source) if codes else None
        if values is None or codes[0].source != setup_cell(*values):
            found.append(f"{path.name}: the first code cell is not the canonical setup cell")
            continue
        stamps.add(values)
        markdown = next((c.source for c in notebook.cells if c.cell_type == "markdown"), "")
        try:
            expected = badge(*values, path.name)
        except ValueError as error:
            found.append(f"{path.name}: {error}")
            continue
        if expected not in markdown:
            found.append(f"{path.name}: the first markdown cell lacks the badge {expected}")
    if len(stamps) > 1:
        found.append(f"the notebooks name different addresses or revisions: {sorted(stamps)}")
    return found


def main(argv=None):
    """Stamp (or with --check, check) every notebook; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", help="https://github.com/OWNER/REPO (default: the stamped one)")
    parser.add_argument("--rev", help="branch, tag or commit (default: the stamped one, or main)")
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 on drift")
    parser.add_argument("--notebooks", default=ROOT / "notebooks", type=Path,
                        help=argparse.SUPPRESS)  # the tests stamp copies
    args = parser.parse_args(argv)
    paths = notebook_paths(args.notebooks)
    if not paths:
        print(f"no notebooks in {args.notebooks}", file=sys.stderr)
        return 2
    if args.check:
        found = problems(paths)
        print("\n".join(found) or f"{len(paths)} notebooks stamped alike")
        return 1 if found else 0
    stamps = set()
    for path in paths:
        codes = [c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]
        stamps.add(stamped_values(codes[0].source) if codes else None)
    stamps.discard(None)
    if len(stamps) > 1 and not (args.repo and args.rev):
        print(f"the notebooks carry different stamps {sorted(stamps)}: give --repo and --rev",
              file=sys.stderr)
        return 2
    repo, rev = stamps.pop() if stamps else (PLACEHOLDER, DEFAULT_REV)
    repo, rev = args.repo or repo, args.rev or rev
    try:
        badge(repo, rev, "x.ipynb"), setup_cell(repo, rev)
    except ValueError as error:
        print(error, file=sys.stderr)
        return 2
    texts = {}
    try:  # stamp all in memory first: a notebook that cannot be stamped leaves every file as is
        for path in paths:
            notebook = nbformat.read(path, as_version=4)
            for note in stamp(notebook, path.name, repo, rev):
                print(note)
            texts[path] = nbformat.writes(notebook) + "\n"
    except (ValueError, SyntaxError) as error:
        print(f"{path.name}: {error}", file=sys.stderr)
        return 2
    for path, text in texts.items():
        if text != path.read_text():
            path.write_text(text)
            print(f"stamped {path.name}")
    print(f"{len(paths)} notebooks point at {repo} @ {rev}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
