"""The package build's compiled part: the domain core's hot modules, compiled with Cython from their ``.py``
sources as setuptools ``ext_modules`` (everything else is declared in pyproject.toml).

A wheel carries each module both compiled and as its source; ``pip install -e .`` and ``make compile``
(``python setup.py build_ext --inplace``) build them beside the sources in the checkout. Either way the build
records the SHA-256 of each source it compiled in ``streamproc/domain/.compiled.json`` beside the modules, which
importing ``streamproc.domain`` checks (``streamproc/compiled.py``): a compiled module never shadows an edited
source. An in-place build recompiles only the modules whose source differs from the recorded one (or that are
not built); ``--force`` recompiles all.

``STREAMPROC_PURE_PYTHON=1`` at build time builds no extension modules: a pure-Python wheel or editable install.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from types import ModuleType

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

PACKAGE = "streamproc.domain"
SOURCES = Path("streamproc", "domain")  # relative to the project root, where setuptools runs this file


def _core() -> ModuleType:
    """streamproc/compiled.py (the module list, manifest name and digest), loaded without importing the package,
    whose dependencies a build environment does not have."""
    spec = importlib.util.spec_from_file_location("_streamproc_compiled", Path("streamproc", "compiled.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BuildCore(build_ext):
    """Cythonizes the core's sources (the pending ones, in place), builds them, and records their digests."""

    def finalize_options(self) -> None:
        super().finalize_options()
        if not self.parallel:
            self.parallel = True  # one compiler per CPU: the three modules build side by side

    def run(self) -> None:
        if not self.extensions:  # STREAMPROC_PURE_PYTHON
            return
        from Cython.Build import cythonize  # pinned in [build-system] requires (and in the dev extra)

        core = _core()
        short = {ext.name: ext.name.rpartition(".")[2] for ext in self.extensions}
        # of the sources about to be compiled, taken before compiling them
        digests = {short[ext.name]: core.digest(Path(ext.sources[0])) for ext in self.extensions}
        if self.inplace:
            package_dir = Path(self.get_finalized_command("build_py").get_package_dir(PACKAGE))
            manifest = package_dir / core.MANIFEST_NAME
            try:
                recorded = dict(json.loads(manifest.read_text()))
            except (OSError, ValueError):
                recorded = {}
            todo = [ext for ext in self.extensions
                    if self.force or recorded.get(short[ext.name]) != digests[short[ext.name]]
                    or not Path(self.get_ext_fullpath(ext.name)).exists()]
        else:  # a wheel: everything, into build_lib
            manifest = Path(self.build_lib, *PACKAGE.split("."), core.MANIFEST_NAME)
            recorded, todo = {}, list(self.extensions)
        if not todo:
            print("compiled core: up to date")
            return
        for ext in todo:
            recorded.pop(short[ext.name], None)
        # annotations stay hints, as in the interpreter: a `float` never turns an int into a C double, a `dict`
        # still accepts a defaultdict. The C files go to the build's scratch directory, not beside the sources.
        translated = cythonize(todo, language_level=3, quiet=True, force=True,
                               build_dir=str(Path(self.build_temp, "cython")),
                               compiler_directives={"annotation_typing": False})
        for ext, c_ext in zip(todo, translated, strict=True):  # the finalized extensions, now built from C
            ext.sources = c_ext.sources
        self.extensions = todo
        self.force = True  # the C files are new: never keep an object or module of an earlier build
        super().run()
        for ext in todo:
            recorded[short[ext.name]] = digests[short[ext.name]]
        manifest.parent.mkdir(parents=True, exist_ok=True)
        manifest.write_text(json.dumps(dict(sorted(recorded.items())), indent=1) + "\n")
        print(f"compiled core: built {', '.join(short[ext.name] for ext in todo)} ({manifest})")

    def copy_extensions_to_source(self) -> None:
        # a new file, not the old one rewritten: a process that has the old build loaded keeps its mapping intact
        for ext in self.extensions:
            Path(self.get_ext_fullpath(ext.name)).unlink(missing_ok=True)
        super().copy_extensions_to_source()


PURE = os.environ.get("STREAMPROC_PURE_PYTHON", "") not in ("", "0")
setup(
    ext_modules=[] if PURE else [Extension(f"{PACKAGE}.{name}", [str(SOURCES / f"{name}.py")])
                                 for name in _core().MODULES],
    cmdclass={"build_ext": BuildCore},
)
