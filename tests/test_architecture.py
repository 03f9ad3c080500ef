"""The layout rules of the package, checked on its source: no import cycles, modules, classes and
functions of readable size, private torch APIs only in the CPU backend, thin command modules."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "minigpt"
SOURCES = {".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"): p
           for p in sorted(PACKAGE.rglob("*.py"))}
COMMANDS = ("train", "generate", "classify", "inspect", "convert", "serve", "eval")
PRIVATE_TORCH = re.compile(r"torch\.ops\.mkldnn|torch\.cpu\._|_load_from_state_dict|\.resize_\(|_reorder_linear_weight"
                           r"|_linear_pointwise|_is_mkldnn_bf16_supported|_weight_int8pack_mm")


def tree(module: str) -> ast.Module:
    return ast.parse(SOURCES[module].read_text(encoding="utf-8"))


def imported(module: str) -> set[str]:
    """The minigpt modules `module` imports, at any depth of its code (lazy imports count)."""
    package = module if SOURCES[module].name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree(module)):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in SOURCES else base)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    # Importing a.b.c first runs the packages a.b and a: they count as imported too.
    found |= {m.rpartition(".")[0] for m in found if "." in m}
    return {m for m in found if m in SOURCES and m != module and not module.startswith(m + ".")}


def test_no_import_cycles():
    graph = {m: imported(m) for m in SOURCES if m != "minigpt"}
    graph = {m: {d for d in deps if d != "minigpt"} for m, deps in graph.items()}
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                pytest.fail("import cycle: " + " -> ".join(path[path.index(d):] + [m, d]) if d in path
                            else f"import cycle through {m} -> {d}")
            if d not in state:
                visit(d, path + [m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])


@pytest.mark.parametrize("module", sorted(SOURCES))
def test_sizes(module):
    text = SOURCES[module].read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 400, f"{module}: {len(text.splitlines())} lines"
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            limit = 150 if isinstance(node, ast.ClassDef) else 999 if node.name == "build_parser" else 50
            assert length <= limit, f"{module}.{node.name}: {length} lines"


def test_private_torch_apis_only_in_the_cpu_backend():
    users = sorted(m for m, p in SOURCES.items() if PRIVATE_TORCH.search(p.read_text(encoding="utf-8")))
    assert users == ["minigpt.backends.cpu", "minigpt.backends.quantize"]


def test_model_reads_as_gpt2_alone():
    assert imported("minigpt.model") <= {"minigpt.config", "minigpt.errors", "minigpt.loss"}
    assert imported("minigpt.loss") <= {"minigpt.errors"}


@pytest.mark.parametrize("command", COMMANDS)
def test_command_modules_are_thin_entry_points(command):
    body = [n for n in tree(f"minigpt.{command}").body if not isinstance(n, (ast.Expr, ast.Import, ast.ImportFrom))]
    assert len(body) == 1 and isinstance(body[0], ast.If), f"minigpt/{command}.py should only call cli.{command}.main"
    assert f"minigpt.cli.{command}" in imported(f"minigpt.{command}")
