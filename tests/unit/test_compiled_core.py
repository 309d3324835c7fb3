"""The Cython-compiled domain core (setup.py builds it, streamproc/compiled.py guards it): the same results as its
pure-Python sources, and never an outdated build."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from streamproc import compiled

ROOT = Path(__file__).resolve().parents[2]

# one in-process pipeline run (batch step, sweep, trainer, checkpoints), summarised as hashes of every stored
# state blob and feature row and of every output, in order
RUN = """
import asyncio, hashlib, json, orjson
from streamproc import compiled
from streamproc.training.offline import run_offline
from streamproc.settings import Settings
from streamproc.tools.simulate import SimulationConfig, Simulator

outputs = []
def keep(result):
    outputs.append(orjson.dumps([result.alerts, result.recommendations, result.examples, result.segment_moves],
                                option=orjson.OPT_SORT_KEYS))

async def main():
    sim = Simulator(SimulationConfig(customers=300, days=150, seed=11))
    bundle, _, store = await run_offline(list(sim.payloads()), Settings(), 1000, on_result=keep)
    rows = hashlib.sha256()
    for cid in sorted(store.rows):
        _, blob, feats = store.rows[cid]
        rows.update(cid.encode() + b"|" + blob + b"|" + (feats or b""))
    print(json.dumps({"core": compiled.status(), "customers": len(store.rows), "rows": rows.hexdigest(),
                      "outputs": hashlib.sha256(b"".join(outputs)).hexdigest(), "output_bytes": sum(map(len, outputs)),
                      "model": hashlib.sha256(bundle.dumps()).hexdigest()}))

asyncio.run(main())
"""


def _run(package_root: Path) -> dict[str, object]:
    env = {**os.environ, "PYTHONPATH": str(package_root), "PYTHONHASHSEED": "0"}
    done = subprocess.run([sys.executable, "-c", RUN], env=env, cwd=package_root, capture_output=True, text=True,
                          timeout=300, check=True)
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def _built() -> bool:
    return all(compiled._extensions(name) for name in compiled.MODULES)


def test_the_compiled_core_is_built_where_it_is_required():
    """`make test` builds the core and sets STREAMPROC_REQUIRE_COMPILED: the suite then runs on compiled code."""
    if os.environ.get("STREAMPROC_REQUIRE_COMPILED") != "1":
        pytest.skip("STREAMPROC_REQUIRE_COMPILED is not set (make test sets it)")
    import streamproc.domain.churn
    import streamproc.domain.customer
    import streamproc.domain.recommend

    assert streamproc.domain.customer.__file__ and streamproc.domain.churn and streamproc.domain.recommend

    assert _built() and compiled.status() == "compiled"


@pytest.mark.skipif(not _built(), reason="no compiled core here (`make compile` builds it)")
def test_compiled_and_source_modules_give_byte_identical_results(tmp_path: Path):
    """The same simulated history through the whole in-process pipeline, once on the compiled core and once on a
    copy of the package without it: every state blob, feature row, output and the trained model bundle agree."""
    pure_root = tmp_path / "pure"
    shutil.copytree(ROOT / "streamproc", pure_root / "streamproc",
                    ignore=shutil.ignore_patterns("*.so", "*.pyd", ".compiled.json", "__pycache__"))
    fast = _run(ROOT)
    slow = _run(pure_root)
    assert fast["core"] == "compiled" and slow["core"] == "pure Python"
    assert fast["customers"] == slow["customers"] and int(str(fast["customers"])) > 250
    assert int(str(fast["output_bytes"])) > 0
    for key in ("rows", "outputs", "output_bytes", "model"):
        assert fast[key] == slow[key], key


def test_a_build_of_another_version_of_a_source_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A compiled module shadows its source: once the source changes, importing the domain must fail loudly
    instead of running the old build; a build with no manifest is refused too; no build at all is fine."""
    domain = tmp_path / "domain"
    domain.mkdir()
    for name in compiled.MODULES:
        (domain / f"{name}.py").write_text(f"X = '{name}'\n")
    monkeypatch.setattr(compiled, "DOMAIN", domain)
    monkeypatch.setattr(compiled, "MANIFEST", domain / ".compiled.json")
    assert compiled.stale() == []  # pure sources only
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    (domain / f"customer{suffix}").write_bytes(b"")
    assert compiled.stale() == ["customer"]  # built, but no record of what from
    compiled.MANIFEST.write_text(json.dumps({"customer": compiled.digest(domain / "customer.py")}))
    compiled.check_fresh()  # built from this very source
    (domain / "customer.py").write_text("X = 'edited'\n")
    with pytest.raises(ImportError, match=r"customer\.py changed since the compiled core was built"):
        compiled.check_fresh()
    compiled.clean()
    assert not list(domain.glob(f"*{suffix}")) and not compiled.MANIFEST.exists() and compiled.stale() == []


def _can_build() -> bool:
    compiler = (os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc").split()[0]
    return importlib.util.find_spec("Cython") is not None and shutil.which(compiler) is not None


def _project(root: Path) -> Path:
    """A copy of the project's build files around a stand-in domain core: three one-line modules (quick to
    compile), the real setup.py and streamproc/compiled.py."""
    (root / "streamproc" / "domain").mkdir(parents=True)
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, root / name)
    (root / "streamproc" / "__init__.py").write_text("")
    shutil.copy2(ROOT / "streamproc" / "compiled.py", root / "streamproc" / "compiled.py")
    (root / "streamproc" / "domain" / "__init__.py").write_text(
        (ROOT / "streamproc" / "domain" / "__init__.py").read_text())
    for name in compiled.MODULES:
        (root / "streamproc" / "domain" / f"{name}.py").write_text(f"X = '{name}'\n")
    return root


def _setup(root: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([sys.executable, "setup.py", "build_ext", *args], cwd=root, env={**os.environ, **env},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def _import(root: Path, name: str) -> subprocess.CompletedProcess[str]:
    code = f"import streamproc.domain.{name} as m; print(m.__file__, m.X)"
    return subprocess.run([sys.executable, "-c", code], cwd=root, env={**os.environ, "PYTHONPATH": str(root)},
                          capture_output=True, text=True, timeout=60)


@pytest.mark.skipif(not _can_build(), reason="needs Cython (the dev extra) and a C compiler")
def test_the_package_build_compiles_the_core_and_records_what_from(tmp_path: Path):
    """setup.py's build_ext (what `pip install -e .` and `make compile` run in place) compiles exactly
    compiled.MODULES from their .py sources and records their digests; rebuilding recompiles only an edited
    module; an edit it has not rebuilt is refused at import; a wheel's build (not in place) carries the record."""
    root = _project(tmp_path / "project")
    domain = root / "streamproc" / "domain"
    _setup(root, "--inplace")
    built = {name: [domain / f"{name}{suffix}" for suffix in importlib.machinery.EXTENSION_SUFFIXES
                    if (domain / f"{name}{suffix}").exists()] for name in compiled.MODULES}
    assert all(len(paths) == 1 for paths in built.values()), built
    assert json.loads((domain / compiled.MANIFEST_NAME).read_text()) == {
        name: compiled.digest(domain / f"{name}.py") for name in compiled.MODULES}
    assert not list(domain.glob("*.c")), "the C files belong in the build directory"
    done = _import(root, "churn")
    assert done.returncode == 0 and done.stdout.split() == [str(built["churn"][0]), "churn"], done.stderr

    assert "up to date" in _setup(root, "--inplace").stdout
    (domain / "churn.py").write_text("X = 'edited'\n")
    refused = _import(root, "customer")
    assert refused.returncode != 0 and "churn.py changed since the compiled core was built" in refused.stderr
    before = {name: built[name][0].stat().st_mtime_ns for name in compiled.MODULES}
    assert "built churn " in _setup(root, "--inplace").stdout
    after = {name: built[name][0].stat().st_mtime_ns for name in compiled.MODULES}
    assert [name for name in compiled.MODULES if after[name] != before[name]] == ["churn"]
    done = _import(root, "churn")
    assert done.returncode == 0 and done.stdout.split() == [str(built["churn"][0]), "edited"], done.stderr

    lib = tmp_path / "lib"
    _setup(root, "--build-lib", str(lib))
    assert json.loads((lib / "streamproc" / "domain" / compiled.MANIFEST_NAME).read_text()) == {
        name: compiled.digest(domain / f"{name}.py") for name in compiled.MODULES}
    assert {p.name.partition(".")[0] for p in (lib / "streamproc" / "domain").iterdir()
            if p.name != compiled.MANIFEST_NAME} == set(compiled.MODULES)


def test_the_pure_python_escape_hatch_builds_nothing(tmp_path: Path):
    """STREAMPROC_PURE_PYTHON=1 at build time: no extension modules (and no Cython needed)."""
    root = _project(tmp_path / "project")
    _setup(root, "--inplace", STREAMPROC_PURE_PYTHON="1")
    assert sorted(p.name for p in (root / "streamproc" / "domain").iterdir()) == sorted(
        ["__init__.py", *(f"{name}.py" for name in compiled.MODULES)])
