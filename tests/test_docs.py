"""The documentation builds cleanly and every Python snippet in it runs.

* ``mkdocs build --strict`` (mkdocs-material + mkdocstrings) into a temporary directory: broken links, missing
  pages, bad API references or docstrings that mkdocstrings cannot render fail the build.
* Every ```` ```python ```` block of every page under ``docs/`` is executed: blocks with ``>>>`` prompts run
  as doctests (their printed output is checked), other blocks run as plain scripts, in page order, sharing
  one namespace per page.  Blocks that import an optional dependency are skipped with a reason naming it
  when it is not installed.
* The shell sessions (```` ```console ```` blocks, ``$ `` prompts) of the command-line page run in a temporary
  directory; each command must exit 0 and print what the page shows (doctest rules: ``...`` matches
  anything, whitespace is normalised; byte sizes are not compared).
"""

from __future__ import annotations

import doctest
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
FENCE = re.compile(r"^```python[^\n]*\n(.*?)^```\s*$", re.S | re.M)
CONSOLE = re.compile(r"^```console[^\n]*\n(.*?)^```\s*$", re.S | re.M)
# optional dependencies a snippet may import -> pip package that provides it
OPTIONAL = {"dask": "dask", "distributed": "distributed", "faiss": "faiss-cpu", "matplotlib": "matplotlib",
            "torch": "torch", "transformers": "transformers", "psutil": "psutil"}
DOCTEST_FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def python_blocks(page: Path) -> list[tuple[int, str]]:
    """(line number, code) of every ```python block of a page."""
    text = page.read_text()
    return [(text.count("\n", 0, m.start()) + 2, m.group(1)) for m in FENCE.finditer(text)]


PAGES = sorted(p for p in DOCS.rglob("*.md") if python_blocks(p))


def test_mkdocs_build_strict(tmp_path: Path) -> None:
    for module, package in (("mkdocs", "mkdocs"), ("material", "mkdocs-material"),
                            ("mkdocstrings", "mkdocstrings[python]")):
        pytest.importorskip(module, reason=f"{package} is not installed (pip install -e '.[docs]')")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml"),
         "--site-dir", str(tmp_path / "site")],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout}\n{proc.stderr}"
    for page in ("index.html", "theory/index.html", "api/index.html", "benchmarks/index.html"):
        assert (tmp_path / "site" / page).is_file(), f"{page} was not built"
    bench = (tmp_path / "site" / "benchmarks" / "index.html").read_text()
    assert "Benchmark suite (issue 3)" in bench and "bench_query_time.png" in bench, \
        "the benchmarks page does not show benchmarks/RESULTS.md (docs/_hooks/benchmark_results.py)"
    api = (tmp_path / "site" / "api" / "index.html").read_text()
    for name in ("KeySketch", "heavy_entries", "HeavyEntries", "UniversalSet", "leverage_scores"):
        assert name in api, f"API reference lacks {name}"


def test_every_page_with_code_is_checked() -> None:
    """Guards the collector: the task pages do contain Python blocks, so an empty list means a broken regex."""
    names = {p.name for p in PAGES}
    assert {"index.md", "stream-keys.md", "merge-shards.md", "query-heavy-entries.md"} <= names


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(DOCS)) for p in PAGES])
def test_python_snippets_run(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    namespace: dict = {"__name__": "__docs__"}
    parser = doctest.DocTestParser()
    runner = doctest.DocTestRunner(optionflags=DOCTEST_FLAGS)
    for line, code in python_blocks(page):
        where = f"{page.relative_to(ROOT)}:{line}"
        for module, package in OPTIONAL.items():
            if re.search(rf"^\s*(>>> )?(import|from) {module}\b", code, re.M) and \
                    importlib.util.find_spec(module) is None:
                pytest.skip(f"{where} needs {package}, which is not installed")
        if ">>>" in code:
            test = parser.get_doctest(code, namespace, where, str(page), line)
            result = runner.run(test, clear_globs=False)
            namespace.update(test.globs)  # DocTest works on a copy of the namespace
            assert result.failed == 0, f"doctest failures in {where} (see the output above)"
        else:
            exec(compile(code, where, "exec"), namespace)


def console_sessions(page: Path) -> list[tuple[int, str, str]]:
    """(line number, command, expected output) of every ``$ `` command in the page's console blocks."""
    text = page.read_text()
    out = []
    for m in CONSOLE.finditer(text):
        first = text.count("\n", 0, m.start()) + 2
        lines = m.group(1).splitlines()
        for i, line in enumerate(lines):
            if line.startswith("$ "):
                expected = []
                for nxt in lines[i + 1:]:
                    if nxt.startswith("$ "):
                        break
                    expected.append(nxt)
                out.append((first + i, line[2:], "\n".join(expected) + ("\n" if expected else "")))
    return out


def test_command_line_page_sessions(tmp_path: Path) -> None:
    page = DOCS / "command-line.md"
    sessions = console_sessions(page)
    assert len(sessions) >= 10, "the command-line page lost its shell sessions"
    bindir = os.path.dirname(sys.executable)
    env = dict(os.environ, PATH=bindir + os.pathsep + os.environ.get("PATH", ""))
    assert shutil.which("levstream", path=env["PATH"]), "the levstream command is not installed (pip install -e .)"
    checker = doctest.OutputChecker()

    def sizes_masked(text: str) -> str:  # byte counts follow the file format, not the documented behaviour
        text = re.sub(r"[\d.,]+ kB", "<size> kB", text)
        return re.sub(r"(file|memory) bytes( +)[\d,]+", r"\1 bytes\2<bytes>", text)

    for line, command, expected in sessions:
        proc = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=600)
        got = proc.stderr + proc.stdout
        assert proc.returncode == 0, f"command-line.md:{line}: `{command}` exited {proc.returncode}:\n{got}"
        assert checker.check_output(sizes_masked(expected), sizes_masked(got), DOCTEST_FLAGS), (
            f"command-line.md:{line}: `{command}` printed\n{got}\nbut the page shows\n{expected}")


def test_benchmark_suite_smoke_run(tmp_path: Path) -> None:
    """The suite that produces the plots and tables of the benchmarks page runs end to end (tiny sizes)."""
    pytest.importorskip("matplotlib", reason="matplotlib is not installed (pip install -e '.[bench]')")
    pytest.importorskip("psutil", reason="psutil is not installed (pip install -e '.[bench]')")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_suite.py"), "--smoke", "--img-dir", str(tmp_path / "img"),
         "--out-dir", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"bench_suite.py --smoke failed:\n{proc.stdout}\n{proc.stderr}"
    for name in ("bench_build_ratio.png", "bench_query_time.png", "bench_memory.png", "universal_set_size.png"):
        assert (tmp_path / "img" / name).stat().st_size > 1000, f"{name} was not written"
    report = (tmp_path / "bench_suite_smoke.md").read_text()
    for heading in ("### Build vs Gram-only", "### Queries", "### Peak memory vs n", "### Universal set size"):
        assert heading in report
    # the sketch is exact for p = 2: its recall and precision against dense NumPy must be 1
    assert "| levstream sketch |" in report
    row = next(line for line in report.splitlines() if line.startswith("| levstream sketch |"))
    assert row.split("|")[5].strip() == "1.0000" and row.split("|")[6].strip() == "1.0000", row
