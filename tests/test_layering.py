"""The house's shape: front doors (cli, serve, api, client) → capabilities (finetune, evaluate, rag, jobs) →
building blocks (models, generate, data) → leaves (errors, home, json_schema, collector). Every import counts, the
lazy ones inside functions too: an arrow may only point to what a package is allowed to use, and no module may reach
itself again through others (a circle). The package root (`ownllm/__init__.py`) is the users' door and never an
import inside."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "ownllm"
LEAVES = {"errors", "home", "json_schema", "collector"}
BLOCKS = {"models", "data", "generate"}
CAPABILITIES = {"finetune", "evaluate", "rag", "jobs", "export"}
# What each package may import besides itself and the leaves. Capabilities never import each other sideways
# except where one is built on the other: jobs run fine-tuning, fine-tuning measures retention with evaluate.
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "home": {"errors"},
    "json_schema": set(),
    "collector": set(),
    "models": set(),
    "data": {"models"},
    "generate": {"models"},
    "evaluate": BLOCKS,
    "rag": BLOCKS,
    "finetune": BLOCKS | {"evaluate"},
    "jobs": BLOCKS | {"finetune"},
    "export": BLOCKS | {"finetune", "evaluate"},  # a tuned run is merged first; compare measures perplexity/QA
    "client": set(),  # HTTP clients of a server: nothing server-side
    # evaluate: the web UI's model comparison; finetune: classification runs answered by /v1/classify and
    # reinforcement graders checked when a job is created
    "serve": BLOCKS | {"rag", "jobs", "evaluate", "finetune"},
    "api": BLOCKS | CAPABILITIES,
    "cli": BLOCKS | CAPABILITIES | {"serve", "client"},
    "__init__": {"api", "models"},
    "__main__": {"cli"},
}
# Modules a lower layer may import although their package sits higher: small format definitions with no imports
# of their own past the leaves (the fine-tuning run folder is read by models/ when a user names a run).
SHARED_FORMATS = {"ownllm.finetune.run_folder"}


def _module_name(path: Path) -> str:
    parts = ["ownllm", *path.relative_to(SRC).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path) -> tuple[set[str], list[str]]:
    """(ownllm modules it imports, problems such as imports of the package root or relative imports)."""
    modules, problems = set(), []
    here = path.relative_to(SRC)
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                problems.append(f"{here}: relative import (use ownllm.… absolute imports)")
            elif node.module == "ownllm":
                problems.append(f"{here}: imports the package root (`from ownllm import …`)")
            elif node.module and node.module.startswith("ownllm."):
                modules.add(node.module)
                # `from ownllm.pkg import module` names modules too
                modules |= {f"{node.module}.{a.name}" for a in node.names
                            if (SRC / Path(*node.module.split(".")[1:]) / f"{a.name}.py").is_file()}
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "ownllm":
                    problems.append(f"{here}: imports the package root (`import ownllm`)")
                elif alias.name.startswith("ownllm."):
                    modules.add(alias.name)
    return modules, problems


def _graph() -> tuple[dict[str, set[str]], list[str]]:
    graph, problems = {}, []
    for path in sorted(SRC.rglob("*.py")):
        module = _module_name(path)
        imported, found = _imports(path)
        problems += found
        graph[module] = imported
    return graph, problems


def test_every_package_has_a_place() -> None:
    packages = {p.name.removesuffix(".py") for p in SRC.iterdir() if p.suffix == ".py" or (p / "__init__.py").is_file()}
    assert packages <= set(ALLOWED), f"new packages need a place in ALLOWED: {sorted(packages - set(ALLOWED))}"


def test_imports_point_down() -> None:
    graph, problems = _graph()
    for module, imported in graph.items():
        package = _package(module)
        for target in imported:
            target_package = _package(target)
            if target_package in (package, *LEAVES) and not (package in LEAVES and target_package != package):
                continue
            if any(target == shared or target.startswith(f"{shared}.") for shared in SHARED_FORMATS):
                continue
            if target_package not in ALLOWED.get(package, set()):
                problems.append(f"{module} imports {target}: {package} may not use {target_package}")
    for shared in SHARED_FORMATS:
        for target in graph.get(shared, set()):
            if _package(target) not in LEAVES:
                problems.append(f"{shared} is a shared format and may import only {sorted(LEAVES)}, not {target}")
    assert not problems, "\n".join(problems)


def test_no_import_circles() -> None:
    graph, _ = _graph()
    known = set(graph)
    edges = {m: {t for t in targets if t in known and t != m} for m, targets in graph.items()}
    # a package's __init__ re-exporting its modules is not a circle of meaning: skip edges into a parent package
    edges = {m: {t for t in targets if not m.startswith(f"{t}.")} for m, targets in edges.items()}
    circles, state = [], {}

    def visit(module: str, trail: list[str]) -> None:
        state[module] = "open"
        for target in sorted(edges[module]):
            if state.get(target) == "open":
                circles.append(" → ".join([*trail[trail.index(target):], target]))
            elif target not in state:
                visit(target, [*trail, target])
        state[module] = "done"

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert not circles, "\n".join(circles)
