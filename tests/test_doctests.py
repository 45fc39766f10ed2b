"""Every docstring example of the levstream package, and the README quickstart, runs and gives its output.

Modules are discovered, not listed, so examples added by any module are run.  A module (or example)
that needs one of the named optional dependencies, which ``importlib.util.find_spec`` confirms is
not installed, is skipped with a reason naming it; any other failure (including an ImportError from
an installed package) fails the test.
"""

from __future__ import annotations

import doctest
import importlib
import importlib.util
import pkgutil
import sys
from pathlib import Path

import pytest

import levstream

README = Path(__file__).resolve().parents[1] / "README.md"
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE

MODULES = sorted(
    name for _, name, _ in pkgutil.walk_packages(levstream.__path__, "levstream.")
    if name.rsplit(".", 1)[-1] != "__main__"
)


#: The optional dependencies of levstream (pyproject extras) whose absence may skip an example.
OPTIONAL_DEPENDENCIES = ("torch", "dask", "distributed", "matplotlib")


def _optional_dependency(exc: BaseException | None) -> str | None:
    """The named optional dependency whose absence caused ``exc``, or None.

    Follows an ImportError re-raised by levstream with an install hint to the ModuleNotFoundError
    behind it.  Only a package of OPTIONAL_DEPENDENCIES that ``importlib.util.find_spec`` confirms
    is not installed counts: an ImportError from an installed package (a broken install, a renamed
    API) or of any other module is a failure, not a skip."""
    while isinstance(exc, ImportError):
        name = exc.name if isinstance(exc, ModuleNotFoundError) else None
        if name and name.split(".")[0] != "levstream":
            top = name.split(".")[0]
            missing = top in OPTIONAL_DEPENDENCIES and importlib.util.find_spec(top) is None
            return top if missing else None
        exc = exc.__cause__ or exc.__context__
    return None


class _Runner(doctest.DocTestRunner):
    """Collects failures as text and remembers examples that failed only for want of an optional dependency."""

    def __init__(self) -> None:
        super().__init__(optionflags=FLAGS, verbose=False)
        self.missing: set[str] = set()
        self.reports: list[str] = []

    def report_failure(self, out, test, example, got):
        self.reports.append(f"{test.name} line {example.lineno}: {example.source.strip()}\n"
                            f"  expected: {example.want.strip()}\n  got:      {got.strip()}")

    def report_unexpected_exception(self, out, test, example, exc_info):
        dep = _optional_dependency(exc_info[1])
        if dep is not None:
            self.missing.add(dep)
            return
        self.reports.append(f"{test.name} line {example.lineno}: {example.source.strip()}\n"
                            f"  raised {exc_info[0].__name__}: {exc_info[1]}")


def _run(tests: list[doctest.DocTest]) -> None:
    runner = _Runner()
    for test in tests:
        runner.run(test, out=lambda _: None, clear_globs=True)
    assert not runner.reports, "doctest failures:\n" + "\n".join(runner.reports)
    if runner.missing:
        pytest.skip(f"examples need optional dependencies that are not installed: {sorted(runner.missing)}")


def test_modules_were_discovered():
    assert {"levstream.sketch", "levstream.scores", "levstream.results"} <= set(MODULES)


@pytest.mark.parametrize("module_name", MODULES)
def test_module_docstring_examples(module_name):
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        dep = _optional_dependency(exc)
        if dep is None:
            raise
        pytest.skip(f"{module_name} needs the optional dependency {dep!r}, which is not installed")
    tests = [t for t in doctest.DocTestFinder(exclude_empty=True).find(module, module_name) if t.examples]
    _run(tests)


def test_readme_quickstart():
    text = README.read_text(encoding="utf-8")
    test = doctest.DocTestParser().get_doctest(text, {}, "README.md", str(README), 0)
    assert len(test.examples) >= 5, "the README quickstart should be a runnable doctest"
    _run([test])


def test_only_missing_named_optional_dependencies_count(monkeypatch):
    absent = "levstream_test_absent_dependency"  # named optional, and surely not installed
    assert importlib.util.find_spec(absent) is None
    monkeypatch.setattr(sys.modules[__name__], "OPTIONAL_DEPENDENCIES", (absent, "numpy"))
    assert _optional_dependency(ModuleNotFoundError("No module named x", name=absent)) == absent
    assert _optional_dependency(ModuleNotFoundError("x", name=f"{absent}.array")) == absent
    # installed (numpy), or not one of the named optional dependencies: a failure, not a skip
    assert _optional_dependency(ModuleNotFoundError("x", name="numpy.missing_submodule")) is None
    assert _optional_dependency(ModuleNotFoundError("x", name="nmupy")) is None
    assert _optional_dependency(ModuleNotFoundError("x", name="levstream.missing")) is None
    assert _optional_dependency(ImportError("cannot import name 'x'")) is None
    assert _optional_dependency(ValueError("x")) is None
    try:
        try:
            raise ModuleNotFoundError(f"No module named {absent!r}", name=absent)
        except ImportError as inner:
            raise ImportError("levstream.torch needs PyTorch") from inner
    except ImportError as outer:
        assert _optional_dependency(outer) == absent


def test_an_installed_optional_dependency_never_counts_as_missing():
    """An ImportError naming an installed optional dependency fails (e.g. a broken install)."""
    for name in OPTIONAL_DEPENDENCIES:
        if importlib.util.find_spec(name) is not None:
            assert _optional_dependency(ModuleNotFoundError("x", name=name)) is None
