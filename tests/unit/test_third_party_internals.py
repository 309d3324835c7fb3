"""The third-party internals streamproc relies on still exist in the installed versions: an upgrade that removes
or renames one fails here, by name, instead of somewhere in a worker."""

from __future__ import annotations

import importlib
import inspect

import pytest

from streamproc.metrics import PROMETHEUS_INTERNALS
from streamproc.runtime.consumer import THIRD_PARTY_INTERNALS

ALL = {**THIRD_PARTY_INTERNALS, **PROMETHEUS_INTERNALS}


def resolve(dotted: str) -> object:
    """``a.b.C.meth`` -> the object, importing the longest module prefix."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj: object = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:]:
            obj = getattr(obj, name)
        return obj
    raise ImportError(dotted)


def mentioned(owner: object, name: str) -> bool:
    """Whether ``name`` is an attribute, a parameter or an assigned name of ``owner`` (a class: any class of its
    MRO; instance attributes are found in the source that sets them)."""
    if inspect.isfunction(owner):
        return name in owner.__code__.co_varnames[: owner.__code__.co_argcount]
    assert inspect.isclass(owner)
    if any(name in vars(cls) for cls in owner.__mro__):
        return True
    for cls in owner.__mro__:
        try:
            src = inspect.getsource(cls)
        except (OSError, TypeError):  # a builtin or a generated class: no source to set attributes in
            continue
        if f"self.{name} =" in src or f"self.{name}:" in src:
            return True
    return False


@pytest.mark.parametrize(("owner", "name"), sorted(ALL), ids=[f"{o}.{n}" for o, n in sorted(ALL)])
def test_the_internal_still_exists(owner: str, name: str) -> None:
    assert mentioned(resolve(owner), name), f"{owner} has no {name} any more: see {ALL[(owner, name)]!r}"


def test_a_removed_name_is_noticed() -> None:
    assert not mentioned(resolve("faust.transport.consumer.Consumer"), "_no_such_internal")
    assert not mentioned(resolve("aiokafka.producer.message_accumulator.MessageBatch.append"), "_no_such_arg")
