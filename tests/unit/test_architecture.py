"""The shape of the code, checked: size limits, imports, the purity of the domain, private access.

What breaks a limit today is listed below with its size now, as a ceiling: it may shrink and must not grow, and
anything new must keep the limits. The lists are the debt still to pay (the issue on the architecture step)."""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "streamproc"

MAX_CLASS_LINES = 300
MAX_FUNCTION_LINES = 60
MAX_MODULE_LINES = 500

# declarative tables, exempt from the function limit by name: they list, they do not decide
DECLARATIVE = {"streamproc.metrics.Metrics.__init__", "streamproc.cli.build_parser"}

# the debt: name -> its size now (a ceiling)
OVERSIZED_CLASSES: dict[str, int] = {}
OVERSIZED_FUNCTIONS: dict[str, int] = {}
OVERSIZED_MODULES: dict[str, int] = {}

# the only modules allowed to touch third-party internals (each private name is listed there with the version
# it was checked against); ruff's SLF rule holds everywhere else (pyproject.toml)
FORBIDDEN_IN_DOMAIN = ("faust", "mode", "redis", "aiokafka", "kafka", "prometheus_client", "time", "asyncio")
CLOCK_CALLS = {("datetime", "now"), ("datetime", "utcnow"), ("date", "today"), ("time", "time")}


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def trees() -> dict[str, ast.Module]:
    return {name: ast.parse(path.read_text(), str(path)) for name, path in modules().items()}


def spans(kind: tuple[type, ...]) -> dict[str, int]:
    """Qualified name -> lines, for every class or function (nested ones too)."""
    out: dict[str, int] = {}

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                name = f"{prefix}.{child.name}"
                if isinstance(child, kind):
                    assert child.end_lineno is not None
                    out[name] = child.end_lineno - child.lineno + 1
                visit(child, name)

    for module, tree in trees().items():
        visit(tree, module)
    return out


def over(sizes: dict[str, int], limit: int, debt: dict[str, int], exempt: set[str] = frozenset()) -> list[str]:
    return sorted(f"{name}: {n} lines (limit {limit}{f', ceiling {debt[name]}' if name in debt else ''})"
                  for name, n in sizes.items()
                  if name not in exempt and n > max(limit, debt.get(name, 0)))


def test_no_class_function_or_module_over_its_limit() -> None:
    classes = spans((ast.ClassDef,))
    functions = spans((ast.FunctionDef, ast.AsyncFunctionDef))
    lines = {name: len(path.read_text().splitlines()) for name, path in modules().items()}
    assert over(classes, MAX_CLASS_LINES, OVERSIZED_CLASSES) == []
    assert over(functions, MAX_FUNCTION_LINES, OVERSIZED_FUNCTIONS, DECLARATIVE) == []
    assert over(lines, MAX_MODULE_LINES, OVERSIZED_MODULES) == []


def test_the_debt_lists_name_only_what_is_still_oversized() -> None:
    """A paid debt leaves its list (the ceilings stay honest)."""
    classes = spans((ast.ClassDef,))
    functions = spans((ast.FunctionDef, ast.AsyncFunctionDef))
    lines = {name: len(path.read_text().splitlines()) for name, path in modules().items()}
    paid = [n for n in OVERSIZED_CLASSES if classes.get(n, 0) <= MAX_CLASS_LINES]
    paid += [n for n in OVERSIZED_FUNCTIONS if functions.get(n, 0) <= MAX_FUNCTION_LINES]
    paid += [n for n in OVERSIZED_MODULES if lines.get(n, 0) <= MAX_MODULE_LINES]
    assert paid == []


def imported(node: ast.Import | ast.ImportFrom, module: str) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = node.module or ""
    if node.level:  # relative: resolved against the importing module's package
        package = module.rsplit(".", node.level)[0]
        base = f"{package}.{base}" if base else package
    return [base, *(f"{base}.{a.name}" for a in node.names)]


def test_no_function_local_import_of_the_package() -> None:
    found = []
    for module, tree in trees().items():
        for func in ast.walk(tree):
            if isinstance(func, ast.FunctionDef | ast.AsyncFunctionDef):
                for node in ast.walk(func):
                    if isinstance(node, ast.Import | ast.ImportFrom) and any(
                            n.startswith("streamproc") for n in imported(node, module)):
                        found.append(f"{module}.{func.name}:{node.lineno}")
    assert sorted(set(found)) == []


def test_no_import_cycle() -> None:
    names = set(modules())
    graph: dict[str, set[str]] = defaultdict(set)
    for module, tree in trees().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                graph[module] |= {n for n in imported(node, module) if n in names and n != module}
    # a package's __init__ is imported with any of its modules: an edge to it stands
    cycles = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(v: str) -> None:
        state[v] = 1
        stack.append(v)
        for w in sorted(graph[v]):
            if state.get(w) == 1:
                cycles.append([*stack[stack.index(w):], w])
            elif w not in state:
                visit(w)
        stack.pop()
        state[v] = 2

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(names):
        if v not in state:
            visit(v)
    assert cycles == []


@pytest.mark.parametrize("module", [m for m in modules() if m.startswith("streamproc.domain")])
def test_the_domain_imports_no_io_framework_and_reads_no_clock(module: str) -> None:
    tree = trees()[module]
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            for name in imported(node, module):
                if name.split(".")[0] in FORBIDDEN_IN_DOMAIN:
                    bad.append(f"imports {name} (line {node.lineno})")
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and (
                (node.value.id, node.attr) in CLOCK_CALLS):
            bad.append(f"reads the clock: {node.value.id}.{node.attr} (line {node.lineno})")
    assert bad == []


LAYERS_WITHOUT_TOOLS = ("streamproc.domain", "streamproc.pipeline", "streamproc.runtime", "streamproc.adapters",
                        "streamproc.training", "streamproc.ports", "streamproc.config", "streamproc.settings")
NO_STREAM_RUNTIME = ("faust", "mode", "aiokafka", "kafka", "redis")


def imports_of(module: str) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(trees()[module]):
        if isinstance(node, ast.Import | ast.ImportFrom):
            found |= set(imported(node, module))
    return found


def test_the_tools_are_not_imported_by_the_engine() -> None:
    """tools/ (infra, demo, simulator, replay, tail, evaluate) and the command line serve people: the runtime, the
    pipeline, the domain and the adapters work without them."""
    bad = {m: sorted(n for n in imports_of(m) if n.startswith(("streamproc.tools", "streamproc.cli",
                                                                "streamproc.service_commands")))
           for m in modules() if m.startswith(LAYERS_WITHOUT_TOOLS)}
    assert {m: names for m, names in bad.items() if names} == {}


def test_the_pipeline_knows_neither_faust_nor_redis() -> None:
    """The batch step is written against the ports: no stream runtime, no Redis client (the worker hands it raw
    records; the adapters are injected)."""
    bad = {m: sorted(n for n in imports_of(m) if n.split(".")[0] in NO_STREAM_RUNTIME
                     or n.startswith(("streamproc.runtime", "streamproc.adapters.redis_store",
                                      "streamproc.adapters.model_store")))
           for m in modules() if m.startswith(("streamproc.pipeline", "streamproc.ports"))}
    assert {m: names for m, names in bad.items() if names} == {}

