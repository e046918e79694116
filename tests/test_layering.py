"""Imports point down only: front doors (cli, render, api) → capabilities → building blocks."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "ownllm"
FRONT = {"cli", "cli_data", "cli_eval", "cli_jobs", "cli_rag", "render", "api", "serve", "__init__", "__main__"}
CAPABILITIES = {"finetune", "evaluate", "rag", "jobs"}
BLOCKS = {"models", "generate", "data"}
# building blocks in their own order: models may not reach up into generate
ORDER = {"models": 0, "data": 0, "generate": 1}


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ownllm."):
            names.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            names |= {a.name.split(".")[1] for a in node.names if a.name.startswith("ownllm.")}
    return names


def _layer(name: str) -> str:
    return "front" if name in FRONT else "capability" if name in CAPABILITIES else "block"


def test_imports_point_down() -> None:
    problems = []
    for path in SRC.rglob("*.py"):
        package = path.relative_to(SRC).parts[0].removesuffix(".py")
        for target in _imports(path):
            if target == package:
                continue
            if _layer(package) != "front" and _layer(target) == "front":
                problems.append(f"{path.relative_to(SRC)} imports front door {target}")
            if _layer(package) == "block" and _layer(target) == "capability":
                problems.append(f"{path.relative_to(SRC)} imports capability {target}")
            if package in ORDER and target in ORDER and ORDER[target] > ORDER[package]:
                problems.append(f"{path.relative_to(SRC)} imports {target}, which sits above it")
    assert problems == []
