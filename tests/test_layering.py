"""The house rules the CI checks: the layering contract (pyproject.toml [tool.importlinter]) and file size."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "nanochat_ternary"
MAX_LINES = 600  # a file past this is asking to be split


def test_layering_contract_is_kept():
    """cli -> (bench, serve, chat, export) -> train -> eval -> checkpoint -> (model, optim, data) -> config
    -> errors: no module imports a layer above its own (import-linter reads the contract from pyproject)."""
    lint = Path(sys.executable).parent / "lint-imports"
    if not lint.exists():
        pytest.skip("import-linter is not installed (pip install -e '.[test]')")
    proc = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "1 kept, 0 broken" in proc.stdout


def test_no_source_file_is_too_long():
    long = {str(p.relative_to(SRC)): n for p in SRC.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"files over {MAX_LINES} lines: {long}"


MAX_FUNCTION_LINES = 80  # the training path reads like the algorithm: a longer function is asking to be split


def test_no_training_function_is_too_long():
    """Every function (and method) in train/*.py is at most ~80 lines, decorators and docstring included."""
    import ast

    long = {}
    for p in sorted((SRC / "train").glob("*.py")):
        for node in ast.walk(ast.parse(p.read_text(), filename=str(p))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                first = min([node.lineno] + [d.lineno for d in node.decorator_list])
                if (n := node.end_lineno - first + 1) > MAX_FUNCTION_LINES:
                    long[f"{p.name}:{node.lineno} {node.name}"] = n
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines in train/: {long}"
