"""The wheel, installed into a fresh virtualenv and run from a directory outside the checkout, as the image and a
`pip install .` run it: `streamproc topics apply` once failed there (topics.toml was read from the checkout) and
the worker then waited for its topics forever. Everything below runs the installed console script and
interpreter, never the checkout's sources."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest

from streamproc.settings import Settings
from streamproc.tools.demo import processed_total, scrape
from streamproc.topics import admin_client, delete_run_topics, load_specs
from tests.conftest import produce, worker_env

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
# what the image's build stage copies (Dockerfile), less what .dockerignore leaves out: the wheel is built from a
# scratch copy of these, so that only what pyproject.toml declares can reach it (a build/ left in the checkout by
# an earlier build would keep files that are no longer declared) and the checkout gets no build/ of this test's
BUILD_INPUTS = ("pyproject.toml", "setup.py", "README.md", "streamproc")
PIP_TIMEOUT_S = 600.0  # dependencies come from the registry on a cold pip cache
# variables that would point the fresh venv's interpreter at the checkout's sources or at the dev venv
LEAKY_VARIABLES = frozenset({"PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV"})
T0 = 1_767_261_600_000


@dataclass(frozen=True)
class Installed:
    venv: Path
    cwd: Path  # outside the checkout: nothing is found relative to it by accident

    @property
    def python(self) -> str:
        return str(self.venv / "bin" / "python")

    @property
    def streamproc(self) -> str:
        return str(self.venv / "bin" / "streamproc")

    def env(self, base: Mapping[str, str]) -> dict[str, str]:
        env = {k: v for k, v in base.items() if k not in LEAKY_VARIABLES}
        # the dev venv's bin (and anything else in the checkout) off the PATH, the fresh venv's first
        kept = [p for p in env.get("PATH", "").split(os.pathsep) if p and not _inside(Path(p), ROOT)]
        env["PATH"] = os.pathsep.join([str(self.venv / "bin"), *kept])
        env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
        return env

    def run(self, args: list[str], env: Mapping[str, str], timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(args, cwd=self.cwd, env=self.env(env), capture_output=True, text=True, timeout=timeout)


def _inside(path: Path, folder: Path) -> bool:
    return path.resolve().is_relative_to(folder.resolve())


def _build_wheel(scratch: Path, out: Path) -> Path:
    source = scratch / "source"
    source.mkdir()
    for name in BUILD_INPUTS:
        if (ROOT / name).is_dir():
            # the checkout's own build of the compiled core stays behind: the wheel must build its own
            shutil.copytree(ROOT / name, source / name,
                            ignore=shutil.ignore_patterns("__pycache__", "*.so", ".compiled.json"))
        else:
            shutil.copy2(ROOT / name, source / name)
    wheel = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(out), str(source)]
    # without build isolation first (offline, and fast: no build environment to set up); a dev venv whose setuptools
    # cannot build the wheel (older than pyproject's build requirement, no bdist_wheel) makes pip fetch its own
    done = subprocess.run([*wheel, "--no-build-isolation"], capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
    if done.returncode != 0:
        done = subprocess.run(wheel, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
    assert done.returncode == 0, f"pip wheel failed:\n{done.stdout}{done.stderr}"
    (built,) = out.glob("streamproc-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    """The checkout's wheel in a new venv (built and installed once for the module)."""
    work = tmp_path_factory.mktemp("packaged")
    assert not _inside(work, ROOT), "the scratch directory must be outside the checkout"
    wheel = _build_wheel(work, work / "dist")
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True, timeout=120)
    cwd = work / "cwd"
    cwd.mkdir()
    result = Installed(venv, cwd)
    done = result.run([result.python, "-m", "pip", "install", "--quiet", str(wheel)], os.environ,
                      timeout=PIP_TIMEOUT_S)
    assert done.returncode == 0, f"pip install failed:\n{done.stdout}{done.stderr}"
    yield result
    # a venv is ~300 MB, and pytest keeps the temporary directories of its last runs
    shutil.rmtree(work, ignore_errors=True)


def _plain_env(**extra: str) -> dict[str, str]:
    # no STREAMPROC_* or XDG_* of the caller's (`make test` sets some): the defaults are what is checked
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STREAMPROC_", "XDG_"))}
    return {**env, **extra}


def test_the_installed_package_is_imported_and_lists_its_topics(installed: Installed) -> None:
    code = "import streamproc, streamproc.contracts as c; print(streamproc.__file__); print(c.TOPICS_FILE)"
    done = installed.run([installed.python, "-c", code], _plain_env())
    assert done.returncode == 0, done.stderr
    module, topics_file = (Path(line) for line in done.stdout.split())
    for path in (module, topics_file):
        assert _inside(path, installed.venv) and not _inside(path, ROOT), path
    assert topics_file.is_file()

    # the wheel carries the compiled domain core (setup.py), with the sources beside it
    code = ("import streamproc.compiled as c, streamproc.domain.churn, streamproc.domain.recommend;"
            " import streamproc.domain.customer as m; print(c.status()); print(m.__file__);"
            " print(all((c.DOMAIN / f'{n}.py').is_file() for n in c.MODULES))")
    done = installed.run([installed.python, "-c", code], _plain_env())
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["compiled", done.stdout.split()[1], "True"], done.stdout
    assert done.stdout.split()[1].endswith(".so") and _inside(Path(done.stdout.split()[1]), installed.venv)

    listed = installed.run([installed.streamproc, "topics", "list"], _plain_env())
    assert listed.returncode == 0, listed.stderr
    assert {line.split()[0] for line in listed.stdout.splitlines() if line.strip()} == set(load_specs())


def test_state_and_cache_default_to_the_xdg_directories_outside_a_checkout(
    installed: Installed, tmp_path: Path
) -> None:
    code = "from streamproc.settings import Settings; s = Settings(); print(s.state_dir); print(s.cache_dir)"

    def dirs(env: dict[str, str]) -> list[Path]:
        done = installed.run([installed.python, "-c", code], env)
        assert done.returncode == 0, done.stderr
        return [Path(line) for line in done.stdout.splitlines()]

    home = tmp_path / "home"
    assert dirs(_plain_env(HOME=str(home))) == [home / ".local/state/streamproc", home / ".cache/streamproc"]
    xdg = _plain_env(HOME=str(home), XDG_STATE_HOME=str(tmp_path / "state"), XDG_CACHE_HOME=str(tmp_path / "cache"))
    assert dirs(xdg) == [tmp_path / "state/streamproc", tmp_path / "cache/streamproc"]
    # a relative XDG value is invalid (the spec): ignored rather than resolved against the working directory
    assert dirs({**xdg, "XDG_STATE_HOME": "relative"})[0] == home / ".local/state/streamproc"
    explicit = {**xdg, "STREAMPROC_STATE_DIR": str(tmp_path / "s"), "STREAMPROC_CACHE_DIR": str(tmp_path / "c")}
    assert dirs(explicit) == [tmp_path / "s", tmp_path / "c"]


def test_a_checkout_keeps_its_local_state_and_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # the dev flows and CI: .local and .cache beside the sources, whatever the XDG variables say
    for var in ("STREAMPROC_STATE_DIR", "STREAMPROC_CACHE_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    s = Settings()
    assert (s.state_dir, s.cache_dir) == (ROOT / ".local", ROOT / ".cache")


def _click(i: int, cid: str) -> bytes:
    return orjson.dumps({"event_id": f"{cid}-e{i}", "customer_id": cid, "ts": T0 + i * 1000, "session_id": f"{cid}-s",
                         "action": "product_view", "product_id": "p1", "category": "books"})


def _purchase(i: int, cid: str, amount: float) -> bytes:
    return orjson.dumps({"event_id": f"{cid}-t{i}", "customer_id": cid, "ts": T0 + i * 1000, "order_id": f"{cid}-o{i}",
                         "type": "purchase", "amount": amount, "currency": "EUR",
                         "items": [{"product_id": "p1", "category": "books", "quantity": 1, "unit_price": amount}]})


def _log_tail(log: Path, n: int = 4000) -> str:
    return log.read_text(errors="replace")[-n:] if log.exists() else ""


def test_topics_apply_and_a_worker_from_the_installed_package(
    installed: Installed, settings: Settings, tmp_path: Path
) -> None:
    state = tmp_path / "installed-state"
    env = {**worker_env(settings), "STREAMPROC_STATE_DIR": str(state)}
    log = tmp_path / "installed-worker.log"
    worker: subprocess.Popen[bytes] | None = None
    try:
        applied = installed.run([installed.streamproc, "topics", "apply"], env)
        assert applied.returncode == 0, applied.stdout + applied.stderr
        declared = {settings.topic(name) for name in load_specs()}
        created = {line.split()[1] for line in applied.stdout.splitlines() if line.startswith("created")}
        assert created == declared, applied.stdout
        admin = admin_client(settings)
        try:
            assert declared <= set(admin.list_topics())
        finally:
            admin.close()

        events = []
        for c in range(3):
            cid = f"cust{c}"
            events += [("clicks", cid.encode(), _click(i, cid)) for i in range(4)]
            events.append(("transactions", cid.encode(), _purchase(1, cid, 10.0 + c)))
        produce(settings, events)

        with open(log, "wb") as out:
            worker = subprocess.Popen([installed.streamproc, "worker"], cwd=installed.cwd, env=installed.env(env),
                                      stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        metrics: dict[str, float] = {}
        while processed_total(metrics) < len(events):
            assert worker.poll() is None, f"the installed worker exited {worker.returncode}\n{_log_tail(log)}"
            assert time.monotonic() < deadline, f"processed {processed_total(metrics)} of {len(events)}\n" + (
                _log_tail(log))
            time.sleep(0.3)
            metrics = scrape(settings.web_port)
        assert metrics['streamproc_events_processed_total{outcome="applied",topic="clicks"}'] == 12

        with urllib.request.urlopen(f"http://127.0.0.1:{settings.web_port}/customers/cust2", timeout=10) as resp:
            found = json.loads(resp.read())["features"]
        assert (found["clicks"], found["frequency"], found["monetary_total"]) == (4, 1, 12.0)
        # the worker's state went where STREAMPROC_STATE_DIR says, not beside the installed package
        assert (state / "faust" / settings.app_id).is_dir()
    finally:
        if worker is not None and worker.poll() is None:
            worker.kill()
            worker.wait(10)
        delete_run_topics(settings)
