"""The Cython-compiled domain core (streamproc/compiled.py): the same results as its pure-Python sources, and
never an outdated build."""

from __future__ import annotations

import importlib.machinery
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from streamproc import compiled

ROOT = Path(__file__).resolve().parents[2]

# one in-process pipeline run (batch step, sweep, trainer, checkpoints), summarised as hashes of every stored
# state blob and feature row and of every output, in order
RUN = """
import asyncio, hashlib, json, orjson
from streamproc import compiled
from streamproc.offline import run_offline
from streamproc.settings import Settings
from streamproc.simulate import SimulationConfig, Simulator

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
    compiled.MANIFEST.write_text(json.dumps({"customer": compiled._digest(domain / "customer.py")}))
    compiled.check_fresh()  # built from this very source
    (domain / "customer.py").write_text("X = 'edited'\n")
    with pytest.raises(ImportError, match=r"customer\.py changed since the compiled core was built"):
        compiled.check_fresh()
    compiled.clean()
    assert not list(domain.glob(f"*{suffix}")) and not compiled.MANIFEST.exists() and compiled.stale() == []
