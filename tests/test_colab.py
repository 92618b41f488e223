"""The notebooks as a fresh Colab runtime runs them (issue 18), and tests/publish_notebooks.py.

A Colab runtime starts in an empty folder, with `google.colab` imported and no copy of this
repository: the setup cell has to clone it. Here the clone comes from ORIGIN, a one-commit git
repository made of this checkout's working tree *as it is on disk* (tracked files with their
uncommitted edits, and new code or text files that git does not ignore), so the test runs the
code you see rather than the last commit. A second commit on top breaks `common.py`: a setup
cell that clones but does not check out the stamped revision (a commit hash) fails at
`import common`.
"""
import ast
import os
import re
import shutil
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

sys.path.insert(0, str(Path(__file__).resolve().parent))
import publish_notebooks as publish  # noqa: E402  (tests/ is not a package)

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = publish.notebook_paths()
NAME = "repo-under-test"  # the origin's folder name, hence the clone's
STUB = {  # a stand-in for Colab's google.colab, first on the kernel's path
    "google/__init__.py": "__path__ = __import__('pkgutil').extend_path(__path__, __name__)\n",
    "google/colab/__init__.py": "from . import drive, files  # Colab's google.colab, stood in\n",
    "google/colab/files.py": "def upload():\n    return {}  # nobody at the browser: no file\n",
    "google/colab/drive.py": "import os\n\n\ndef mount(path, **_):\n"
                             "    os.makedirs(path, exist_ok=True)\n",
}


def git(*args, cwd):
    """Run git without the user's hooks or identity; returns its stdout."""
    command = ["git", "-c", "core.hooksPath=/dev/null", "-c", "user.name=test", "-c",
               "user.email=test@example.invalid", "-c", "commit.gpgsign=false", *args]
    return subprocess.run(command, cwd=cwd, check=True, capture_output=True, text=True).stdout


def working_tree_files():
    """Paths (relative to ROOT) of the checkout's files as they are now: the tracked ones, edits
    included, and new untracked code or text (not a data set unpacked into the checkout)."""
    def listed(*which):
        run = subprocess.run(["git", "ls-files", "-z", *which], cwd=ROOT, capture_output=True,
                             text=True)
        return [Path(p) for p in run.stdout.split("\0") if p] if run.returncode == 0 else None
    tracked, new = listed("--cached"), listed("--others", "--exclude-standard")
    if tracked is None:  # not a git checkout (an unpacked archive): take the folder
        skip = {".git", "runs", "__pycache__", ".pytest_cache"}
        return [p.relative_to(ROOT) for p in ROOT.rglob("*")
                if p.is_file() and not skip & set(p.relative_to(ROOT).parts)]
    new = [p for p in new if p.suffix in {".py", ".ipynb", ".md", ".txt"}]
    return [p for p in tracked + new if (ROOT / p).is_file()]


@pytest.fixture(scope="module")
def origin(tmp_path_factory):
    """(address, revision) of a git repository holding the working tree at that revision."""
    folder = tmp_path_factory.mktemp("origin") / NAME
    for relative in working_tree_files():
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / relative, folder / relative)
    git("init", "-q", cwd=folder)
    git("add", "-A", cwd=folder)
    git("commit", "-q", "-m", "the working tree under test", cwd=folder)
    revision = git("rev-parse", "HEAD", cwd=folder).strip()
    (folder / "common.py").write_text("raise ImportError('the tip of the default branch: the "
                                      "setup cell did not check out REV')\n")
    git("commit", "-q", "-am", "a tip that must not be used", cwd=folder)
    return f"file://{folder}", revision


@pytest.fixture
def colab(tmp_path, monkeypatch):
    """An empty working folder, like /content; the kernel finds the google.colab stand-in first
    on its path and nothing of this checkout."""
    stub = tmp_path / "colab_stub"
    for relative, text in STUB.items():
        (stub / relative).parent.mkdir(parents=True, exist_ok=True)
        (stub / relative).write_text(text)
    kept = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
            if p and Path(p).resolve() != ROOT]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(stub), *kept]))
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")  # the kernel is a fresh process
    monkeypatch.delenv("NO_PROGRESS", raising=False)  # conftest's: the setup cell must set it
    content = tmp_path / "sandbox" / "content"  # its parent, too, holds no scripts
    content.mkdir(parents=True)
    return content


def kernel(notebook, cwd):
    """A client whose kernel starts in cwd with google.colab imported, as Colab's does."""
    return NotebookClient(notebook, timeout=600, kernel_name="python3",
                          resources={"metadata": {"path": str(cwd)}},
                          extra_arguments=["--IPKernelApp.exec_lines=import google.colab"])


def run_cell(client, notebook, source):
    """Append a code cell, execute it; returns its stdout."""
    notebook.cells.append(nbformat.v4.new_code_cell(source))
    cell = client.execute_cell(notebook.cells[-1], len(notebook.cells) - 1)
    return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")


def setup_only(repo, rev):
    """A notebook of just the setup cell stamped with repo and rev."""
    return nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(publish.setup_cell(repo,
                                                                                        rev))])


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_in_a_fresh_colab_runtime(path, origin, colab):
    repo, rev = origin
    assert publish.problems([path]) == [], "run: python tests/publish_notebooks.py"
    notebook = nbformat.read(path, as_version=4)
    publish.stamp(notebook, path.name, repo, rev, with_badge=False)  # only REPO and REV change
    for cell in notebook.cells:
        if "parameters" in cell.metadata.get("tags", []):
            cell.source += "\nFAST = True"
    clone = colab / NAME
    client = kernel(notebook, colab)
    start = time.perf_counter()
    with client.setup_kernel():
        cells = list(enumerate(notebook.cells))
        for index, cell in cells:
            client.execute_cell(cell, index)
        seconds = time.perf_counter() - start
        setup = next(c for c in notebook.cells if c.cell_type == "code")
        printed = "".join(o.get("text", "") for o in setup.outputs)
        assert f"scripts: {clone}, commit {rev[:7]}" in printed
        assert "installing" not in printed  # all there already: nothing (torch least) reinstalled
        # Run again in the same runtime: the clone is reused, sys.path gains nothing.
        before = run_cell(client, notebook, "print(len(sys.path), sorted(os.listdir('..')))")
        client.execute_cell(setup, notebook.cells.index(setup))
        after = run_cell(client, notebook, "print(len(sys.path), sorted(os.listdir('..')))")
        assert before == after == f"{before.split()[0]} ['{NAME}']\n"
        check = ("assert os.getcwd() == ROOT == {!r} and sys.path.count(ROOT) == 1\n"
                 "assert 'google.colab' in sys.modules and common.__file__.startswith(ROOT)\n"
                 "assert os.environ['NO_PROGRESS'] == '1'")
        run_cell(client, notebook, check.format(str(clone)))
    slowest = sorted(((cell_seconds(c), i) for i, c in cells if c.cell_type == "code"),
                     reverse=True)[:3]
    print(f"{path.stem}: {seconds:.0f} s in a Colab-like runtime; slowest cells "
          + ", ".join(f"#{i} {t:.0f} s" for t, i in slowest))


def cell_seconds(cell):
    """How long nbclient saw the cell run."""
    times = cell.metadata.get("execution", {})
    start, end = times.get("iopub.execute_input"), times.get("shell.execute_reply")
    if not (start and end):
        return 0.0
    parse = lambda t: datetime.fromisoformat(t.replace("Z", "+00:00"))  # noqa: E731
    return (parse(end) - parse(start)).total_seconds()


def test_setup_cell_failures_are_one_clear_sentence_and_uploads_need_no_address(origin, colab):
    repo, rev = origin
    notebook = setup_only(publish.PLACEHOLDER, "main")
    client = kernel(notebook, colab)
    cases = [(publish.PLACEHOLDER, "main", "No repository address is set: set REPO"),
             (f"file://{colab.parent}/missing", "main", "The scripts are not here and could not "
                                                         "clone file://"),
             ("https://github.invalid/x/y", "main", "The scripts are not here and could not "
                                                    "clone https://github.invalid/x/y (fatal: "
                                                    "unable to access"),  # no network: no host
             (repo, "no-such-revision", f"The scripts are not here and {repo} has no revision "
                                        "'no-such-revision' (error: pathspec")]
    with client.setup_kernel():
        for address, revision, message in cases:
            notebook.cells[0].source = publish.setup_cell(address, revision)
            with pytest.raises(CellExecutionError) as error:
                client.execute_cell(notebook.cells[0], 0)
            assert error.value.ename == "RuntimeError" and error.value.evalue.startswith(message)
            assert "files.upload()" in error.value.evalue and "drive.mount(" in error.value.evalue
            assert error.value.evalue.count(". ") == 0  # one sentence
            assert os.listdir(colab) == []  # no half-made clone left behind
        # A restarted runtime starts in the working folder again: the clone is reused.
        notebook.cells[0].source = publish.setup_cell(repo, rev)
        for _ in range(2):
            client.execute_cell(notebook.cells[0], 0)
            run_cell(client, notebook, f"assert ROOT == {str(colab / NAME)!r}\nos.chdir('..')")
        # The fallback: the scripts uploaded to the working folder, no address set.
        checkout = repo.removeprefix("file://")  # its files are the broken tip: take REV's
        (colab / "common.py").write_text(git("show", f"{rev}:common.py", cwd=checkout))
        notebook.cells[0].source = publish.setup_cell(publish.PLACEHOLDER, "main")
        client.execute_cell(notebook.cells[0], 0)
        run_cell(client, notebook, f"assert ROOT == {str(colab)!r}; import common")
        # A laptop: the notebook opened from notebooks/ of a checkout uses that checkout.
        run_cell(client, notebook, f"os.chdir({checkout + '/notebooks'!r})")
        client.execute_cell(notebook.cells[0], 0)
        run_cell(client, notebook, f"assert ROOT == os.getcwd() == {checkout!r}")


def test_published_notebooks_carry_one_setup_cell_and_matching_badges():
    check = subprocess.run([sys.executable, str(ROOT / "tests" / "publish_notebooks.py"),
                            "--check"], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


def test_stamping_is_idempotent_and_keeps_the_stamped_address(tmp_path):
    for path in NOTEBOOKS:
        shutil.copy(path, tmp_path)
    stamp = lambda *args: publish.main(["--notebooks", str(tmp_path), *args])  # noqa: E731
    assert stamp("--repo", "https://github.com/someone/seg-papers.git", "--rev", "v1.0") == 0
    first = {p.name: p.read_text() for p in tmp_path.iterdir()}
    assert stamp("--repo", "https://gitlab.com/x/y", "--rev", "v1") == 2  # Colab: GitHub only
    assert stamp() == 0 and stamp("--check") == 0
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == first
    for name, text in first.items():
        notebook = nbformat.reads(text, as_version=4)
        assert "(https://colab.research.google.com/github/someone/seg-papers/blob/v1.0/notebooks/"\
               f"{name})" in notebook.cells[0].source
        setup = next(c for c in notebook.cells if c.cell_type == "code")
        assert publish.stamped_values(setup.source) == ("https://github.com/someone/seg-papers.git",
                                                        "v1.0") and setup.outputs == []
    notebook = nbformat.read(tmp_path / NOTEBOOKS[0].name, as_version=4)
    setup = next(c for c in notebook.cells if c.cell_type == "code")
    setup.source = setup.source.replace("import importlib.util,", "import importlib.util, json,")
    nbformat.write(notebook, tmp_path / NOTEBOOKS[0].name)
    assert stamp("--check") == 1  # an edited setup cell is drift
    publish.stamp(notebook, NOTEBOOKS[0].name, "https://github.com/someone/seg-papers.git", "v1.1")
    nbformat.write(notebook, tmp_path / NOTEBOOKS[0].name)
    assert stamp("--check") == 1  # so is one notebook at another revision


def test_stamping_moves_imports_that_later_cells_use(tmp_path):
    old = ("import os, json, subprocess\nimport matplotlib.pyplot as plt\n"
           "from math import pi as PI\nif 'google.colab' in sys.modules:\n"
           "    !git clone x\n    %cd x\nroot = '..'")
    cells = [nbformat.v4.new_markdown_cell("# Title\n\nCitation.\n\nText."),
             nbformat.v4.new_code_cell(old), nbformat.v4.new_code_cell("FAST = True"),
             nbformat.v4.new_code_cell("import common\nprint(json.dumps(PI), subprocess)")]
    notebook = nbformat.v4.new_notebook(cells=cells)
    notes = publish.stamp(notebook, "x.ipynb", publish.PLACEHOLDER, "main")
    assert notebook.cells[3].source == "import json\nfrom math import pi as PI\nimport common\n" \
                                       "print(json.dumps(PI), subprocess)"
    assert notes and "Citation.\n\n[![Open In Colab]" in notebook.cells[0].source
    assert publish.stamp(notebook, "x.ipynb", publish.PLACEHOLDER, "main") == []  # idempotent
    notebook.cells[1].source = old
    notebook.cells[3].source = "print(root)"
    with pytest.raises(ValueError, match="later cells use root"):
        publish.stamp(notebook, "x.ipynb", publish.PLACEHOLDER, "main")


def test_setup_cell_installs_what_requirements_txt_names_except_torch():
    tree = ast.parse(publish.SETUP_CELL)
    needs = next(ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.Assign)
                 and getattr(node.targets[0], "id", "") == "needs")
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    required = {re.match(r"[A-Za-z0-9_.-]+", line)[0].lower() for line in lines
                if line.strip() and not line.startswith("#")}
    assert required - {"torch"} <= set(needs.values()) and "torch" not in needs.values()
