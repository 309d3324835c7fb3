"""The domain core compiled with Cython: the same ``.py`` sources built into extension modules beside them.

Python imports an extension module in preference to the source of the same name, so a built core replaces the
pure-Python fold, churn inputs and recommender with compiled code of the same source, and removing it
(``clean``) brings the sources back. Nothing else changes: same classes, same pickles, same outputs
(``tests/unit/test_compiled_core.py`` checks the compiled and the source modules give byte-identical state
blobs, feature rows and outputs).

A build records the SHA-256 of each source it compiled (``.compiled.json`` beside them); importing the domain
package refuses a compiled module whose source has changed since, so an edit is never silently shadowed by an
older build. ``python -m streamproc.compiled build`` (``make compile``) rebuilds what is stale and is a no-op
otherwise; ``clean`` removes the build (``make clean-compiled``).
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import json
import os
import sys
import tempfile
from pathlib import Path

DOMAIN = Path(__file__).resolve().parent / "domain"
# the hot pure modules: the per-customer fold and features, churn snapshots and inputs, the recommender
MODULES = ("customer", "churn", "recommend")
MANIFEST = DOMAIN / ".compiled.json"


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _extensions(name: str) -> list[Path]:
    return [DOMAIN / f"{name}{suffix}" for suffix in importlib.machinery.EXTENSION_SUFFIXES
            if (DOMAIN / f"{name}{suffix}").exists()]


def _recorded() -> dict[str, str]:
    try:
        return dict(json.loads(MANIFEST.read_text()))
    except (OSError, ValueError):
        return {}


def stale(digests: dict[str, str] | None = None) -> list[str]:
    """Modules with a compiled build whose source (or the given digest of it) is not the one that was compiled."""
    recorded = _recorded()
    return [name for name in MODULES if _extensions(name) and recorded.get(name) != (
        digests[name] if digests is not None else _digest(DOMAIN / f"{name}.py"))]


def check_fresh() -> None:
    """Refuse to run a compiled module built from another version of its source."""
    outdated = stale()
    if outdated:
        names = ", ".join(f"streamproc/domain/{name}.py" for name in outdated)
        raise ImportError(f"{names} changed since the compiled core was built: run `make compile` to rebuild it, "
                          "or `make clean-compiled` to run the pure-Python sources")


def status() -> str:
    """'compiled' when every core module is an extension module, 'pure Python' when none is, else which are."""
    loaded = [name for name in MODULES
              if getattr(sys.modules.get(f"streamproc.domain.{name}"), "__file__", "").endswith(
                  tuple(importlib.machinery.EXTENSION_SUFFIXES))]
    if len(loaded) == len(MODULES):
        return "compiled"
    return "pure Python" if not loaded else "compiled: " + ", ".join(loaded)


def clean() -> None:
    for name in MODULES:
        for path in _extensions(name):
            path.unlink()
        (DOMAIN / f"{name}.c").unlink(missing_ok=True)
    MANIFEST.unlink(missing_ok=True)


def build(force: bool = False) -> list[str]:
    """Compile the core modules whose build is missing or stale (all with ``force``); returns what was built."""
    from Cython.Build import cythonize  # a build-time dependency only (the dev extra)
    from setuptools import Distribution, Extension
    from setuptools.command.build_ext import build_ext

    digests = {name: _digest(DOMAIN / f"{name}.py") for name in MODULES}  # of the sources about to be compiled
    outdated = stale(digests)
    todo = [name for name in MODULES if force or not _extensions(name) or name in outdated]
    if not todo:
        return []
    for name in todo:
        for path in _extensions(name):
            path.unlink()
    extensions = [Extension(f"streamproc.domain.{name}", [str(DOMAIN / f"{name}.py")]) for name in todo]
    # annotations stay hints, as in the interpreter: a `float` never turns an int into a C double, a `dict`
    # still accepts a defaultdict
    modules = cythonize(extensions, language_level=3, quiet=True, force=True,
                        compiler_directives={"annotation_typing": False})
    dist = Distribution({"name": "streamproc-core", "ext_modules": modules})
    command = build_ext(dist)
    command.inplace = True
    command.parallel = os.cpu_count() or 1
    previous = Path.cwd()
    with tempfile.TemporaryDirectory() as scratch:
        command.build_temp = command.build_lib = scratch
        command.ensure_finalized()
        try:
            os.chdir(DOMAIN.parent.parent)  # "in place" is relative to the directory holding the package
            command.run()
        finally:
            os.chdir(previous)
    recorded = _recorded()
    for name in todo:
        recorded[name] = digests[name]
        (DOMAIN / f"{name}.c").unlink(missing_ok=True)
    MANIFEST.write_text(json.dumps(dict(sorted(recorded.items())), indent=1) + "\n")
    return todo


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["clean"]:
        clean()
        print("compiled core removed: the pure-Python sources run")
        return 0
    if args[:1] != ["build"]:
        print("usage: python -m streamproc.compiled build [--force] | clean", file=sys.stderr)
        return 2
    try:
        built = build(force="--force" in args)
    except ImportError as exc:  # Cython (or setuptools) missing: the dev extra brings them
        print(f"cannot build the compiled core ({exc}): pip install -e '.[dev]' (the pure-Python sources run "
              "meanwhile)", file=sys.stderr)
        return 1
    print(f"compiled core: built {', '.join(built)}" if built else "compiled core: up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
