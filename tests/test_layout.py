"""The house rules of the package, checked on its source: imports go one way, modules stay small.

The package has three wings - the kernel library (``kernels`` <- ``registry`` <- ``ops`` <- the
public API), the SteerLM 2.0 application (``steerlm2``) and the benchmarks (``bench``) - and the
command line on top. Every import of a package module (at module level or inside a function: a
deferred import hides a circle, it does not remove it) is an edge of the graph walked here, with
two deliberate exceptions at the very top: ``cli`` / ``__main__`` dispatch to the wings, and the
root ``__init__`` exposes ``GPTSteerLMModel`` / ``data`` lazily from its ``__getattr__``.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "steerlm_kernels"
MAX_LINES = 500
#: Modules allowed past MAX_LINES, with the reason (none today).
LONG_MODULES: dict[str, str] = {}

#: Layer of each module (longest matching prefix): an import may only go to the same layer or below.
LAYERS: list[tuple[str, float]] = [
    ("steerlm_kernels._C", 0),
    ("steerlm_kernels.kernels", 0),
    ("steerlm_kernels.registry", 1),
    ("steerlm_kernels.validation", 1),
    ("steerlm_kernels.distributed", 2),
    ("steerlm_kernels.ops", 3),
    ("steerlm_kernels.api", 4),
    ("steerlm_kernels.api_linear", 4),
    ("steerlm_kernels.api_dropin", 4),
    ("steerlm_kernels.nn", 5),
    ("steerlm_kernels.megatron", 5),
    ("steerlm_kernels", 6),  # the root __init__: the public API
    ("steerlm_kernels.memory", 6),  # peak extra memory of a call: the demo's and the benchmarks' tool
    ("steerlm_kernels.demo", 7),
    ("steerlm_kernels.hf", 7),  # Hugging Face / TRL integration: above the library, below the application
    ("steerlm_kernels.steerlm2", 8),  # the application's COMMANDS map; its rooms, each above the previous:
    ("steerlm_kernels.steerlm2.formats", 8.1),  # records, templates, labels, JSONL, outputs, provenance
    ("steerlm_kernels.steerlm2.models", 8.2),  # GPTSteerLMModel, loss path, log-probabilities, tiny models
    ("steerlm_kernels.steerlm2.training", 8.3),  # dataset, Trainer, train, sft
    ("steerlm_kernels.steerlm2.datatools", 8.4),  # sampling, sample, score
    ("steerlm_kernels.steerlm2.evaluation", 8.5),  # steer-eval
    ("steerlm_kernels.steerlm2.workflow", 8.6),  # pipeline and its rounds
    ("steerlm_kernels.bench", 9),
    ("steerlm_kernels.cli", 10),
    ("steerlm_kernels.__main__", 10),
]
TOP = {"steerlm_kernels.cli", "steerlm_kernels.__main__"}


def module_files() -> dict[str, Path]:
    """``{dotted module name: path}`` of every Python module of the package."""
    out = {}
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    out[f"{PACKAGE}._C"] = ROOT / "csrc"  # the compiled extension (C++ sources, imports nothing of ours)
    return out


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The package module that importing ``name`` executes last (``a.b.c`` -> the longest known prefix)."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, int, list[str]]]:
    """``(imported package module, line, imported names)`` for every import statement of the file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_pkg = path.name == "__init__.py"
    lazy: set[int] = set()
    if module == PACKAGE:  # the root's lazy re-exports of the application
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and node.name == "__getattr__":
                lazy |= {id(n) for n in ast.walk(node)}
    found = []
    for node in ast.walk(tree):
        if id(node) in lazy:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = _resolve(alias.name, modules)
                if target is not None:
                    found.append((target, node.lineno, []))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".") if is_pkg else module.split(".")[:-1]
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if _resolve(base, modules) is None:
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                target = sub if sub in modules else _resolve(base, modules)
                found.append((target, node.lineno, [] if sub in modules else [alias.name]))
    return found


def layer(module: str) -> float:
    best = max((p for p, _ in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return dict(LAYERS)[best]


@pytest.fixture(scope="module")
def graph() -> dict[str, list[tuple[str, int, list[str]]]]:
    modules = module_files()
    return {m: [e for e in imports_of(m, p, modules) if e[0] != m] for m, p in modules.items() if p.is_file()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import circle of ``edges`` as a list of modules (first == last), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(edges.get(m, ())):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state:
                cycle = visit(n)
                if cycle:
                    return cycle
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(edges):
        if m not in state:
            cycle = visit(m)
            if cycle:
                return cycle
    return None


def test_cycle_finder_finds_a_planted_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "d": {"a", "c"}}) is None


def test_import_resolution_sees_deferred_and_relative_imports(tmp_path):
    modules = {"steerlm_kernels": Path(), "steerlm_kernels.ops": Path(), "steerlm_kernels.ops.x": Path(),
               "steerlm_kernels.registry": Path()}
    src = tmp_path / "x.py"
    src.write_text("def f():\n    from steerlm_kernels import registry\n    from . import x\n"
                   "from ..registry import _private\nimport steerlm_kernels.ops.x\n")
    found = imports_of("steerlm_kernels.ops.y", src, modules)
    assert ("steerlm_kernels.registry", 2, []) in found
    assert ("steerlm_kernels.ops.x", 3, []) in found
    assert ("steerlm_kernels.registry", 4, ["_private"]) in found
    assert ("steerlm_kernels.ops.x", 5, []) in found


def test_no_import_circle(graph):
    edges = {m: {t for t, _, _ in es} for m, es in graph.items() if m not in TOP}
    assert find_cycle(edges) is None, f"import circle: {' -> '.join(find_cycle(edges) or [])}"


def test_imports_go_down_the_layers(graph):
    bad = [f"{m}:{line} imports {t} (layer {layer(m)} -> {layer(t)})"
           for m, es in graph.items() for t, line, _ in es if layer(t) > layer(m)]
    assert not bad, "\n".join(bad)


def test_every_imported_package_module_exists():
    modules = module_files()
    bad = []
    for m, path in modules.items():
        if not path.is_file():
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else []
            bad += [f"{m}:{node.lineno} imports {n}" for n in names
                    if n.startswith(PACKAGE + ".") and n not in modules and n != f"{PACKAGE}._C"]
    assert not bad, "imports of modules that do not exist (moved?):\n" + "\n".join(bad)


def test_every_application_module_is_in_a_room():
    rooms = tuple(p + "." for p, _ in LAYERS if p.startswith("steerlm_kernels.steerlm2."))
    loose = [m for m in module_files() if m.startswith("steerlm_kernels.steerlm2.") and not m.startswith(rooms)
             and m not in {p[:-1] for p in rooms}]
    assert len(rooms) == 6 and not loose, f"application modules outside the rooms: {loose}"


def test_no_private_name_imported_across_modules(graph):
    bad = [f"{m}:{line} imports {name} from {t}" for m, es in graph.items() for t, line, names in es
           for name in names if name.startswith("_") and name != "_C"]
    assert not bad, "\n".join(bad)


def test_modules_are_small():
    long = {m: len(p.read_text().splitlines()) for m, p in module_files().items() if p.is_file()}
    long = {m: n for m, n in long.items() if n > MAX_LINES and m not in LONG_MODULES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_importing_the_library_loads_neither_wing():
    code = ("import sys, steerlm_kernels\n"
            "wings = [m for m in sys.modules if m.startswith(('steerlm_kernels.bench', 'steerlm_kernels.steerlm2'))]\n"
            "print(wings)\nassert not wings")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
