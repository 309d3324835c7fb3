"""The domain core compiled with Cython: the same ``.py`` sources built into extension modules beside them.

The package build compiles them (``setup.py``: setuptools ``ext_modules``, through a ``build_ext`` that
cythonizes the sources): a wheel (``pip wheel .``, ``python -m build``, the Docker image) carries each module both
compiled and as its ``.py`` source, and ``pip install -e .`` (``make deps``) or ``make compile``
(``setup.py build_ext --inplace``) builds them beside the sources of a checkout. ``STREAMPROC_PURE_PYTHON=1`` at
build time builds none. Python imports an extension module in preference to the source of the same name, so a
built core replaces the pure-Python fold, churn inputs and recommender with compiled code of the same source,
and removing it (``clean``, ``make clean-compiled``) brings the sources back. The sources stay the reference:
same classes, same pickles, same outputs (``tests/unit/test_compiled_core.py`` checks the compiled and the
source modules give byte-identical state blobs, feature rows and outputs).

A build records the SHA-256 of each source it compiled (``.compiled.json`` beside them, in the wheel too);
importing the domain package refuses a compiled module whose source has changed since, so an edit is never
silently shadowed by an older build. ``setup.py`` reads ``MODULES``, ``MANIFEST_NAME`` and ``digest`` from this
file (loaded by path: the build needs nothing else of the package), so this module stays standard library only.

``python -m streamproc.compiled status`` says what is built and whether it is current; ``clean`` removes it.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import json
import sys
from pathlib import Path

DOMAIN = Path(__file__).resolve().parent / "domain"
# the hot pure modules: the per-customer fold and features, churn snapshots and inputs, the recommender
MODULES = ("customer", "features", "churn", "recommend")
MANIFEST_NAME = ".compiled.json"  # {module: SHA-256 of the source it was compiled from}, beside the modules
MANIFEST = DOMAIN / MANIFEST_NAME


def digest(path: Path) -> str:
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
        digests[name] if digests is not None else digest(DOMAIN / f"{name}.py"))]


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


def describe() -> str:
    """What is on disk, module by module, without importing the domain (which refuses a stale build)."""
    outdated = stale()
    lines = []
    for name in MODULES:
        built = _extensions(name)
        state = ("compiled, STALE (source changed since)" if name in outdated else "compiled") if built else "source"
        lines.append(f"streamproc.domain.{name}: {state}" + (f" ({built[0].name})" if built else ""))
    return "\n".join(lines)


def clean() -> None:
    """Remove the built modules (and the C files and manifest older builds left beside the sources)."""
    for name in MODULES:
        for path in _extensions(name):
            path.unlink()
        (DOMAIN / f"{name}.c").unlink(missing_ok=True)
    MANIFEST.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["clean"]:
        clean()
        print("compiled core removed: the pure-Python sources run")
        return 0
    if args[:1] == ["status"]:
        print(describe())
        return 1 if stale() else 0
    print("usage: python -m streamproc.compiled status | clean\n"
          "(the package build compiles the core: `make compile`, i.e. `python setup.py build_ext --inplace`, "
          "or `pip install -e .`)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
