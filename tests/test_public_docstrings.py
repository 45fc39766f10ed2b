"""Every public class, function, method and property of the package has a docstring (issue 10)."""

from __future__ import annotations

import inspect

import pytest

import levstream as ls
from levstream import summaries
from levstream.moments import MomentState


def _public_objects():
    for name in ls.__all__:
        obj = getattr(ls, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            yield name, obj
    for cls in (summaries.NormalizerSummary, summaries.GramSummary, summaries.LiftedSummary,
                summaries.CoresetSummary, MomentState):
        yield cls.__name__, cls


def _members(cls):
    for name, member in vars(cls).items():
        if name.startswith("_"):
            continue
        if isinstance(member, property) or inspect.isfunction(member) or isinstance(member, (classmethod, staticmethod)):
            yield name, member


def _documented(cls, name):
    """A member is documented by its own docstring or by the one it overrides (as the API reference shows)."""
    for klass in cls.__mro__:
        member = vars(klass).get(name)
        if member is None:
            continue
        target = member.fget if isinstance(member, property) else getattr(member, "__func__", member)
        if (getattr(target, "__doc__", None) or "").strip():
            return True
    return False


@pytest.mark.parametrize("name, obj", list(_public_objects()), ids=lambda x: x if isinstance(x, str) else "")
def test_public_names_have_docstrings(name, obj):
    assert inspect.getdoc(obj), f"{name} has no docstring"
    if inspect.isclass(obj):
        missing = []
        for member_name, _ in _members(obj):
            if not _documented(obj, member_name):
                missing.append(member_name)
        assert not missing, f"{name}: public members without a docstring: {missing}"
