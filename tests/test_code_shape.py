"""No function in the project's code over 80 lines or over McCabe complexity 15: a function that long or that
branchy is split into named steps. The project's code is the package, the training scripts and the entry points at
the root, found by glob so that moved or new modules stay covered; benchmarks/ and tests/ are not held to it."""
from __future__ import annotations

import ast
from pathlib import Path

import mccabe
import pytest
from support.data import ROOT

MAX_LINES = 80
MAX_COMPLEXITY = 15
PATTERNS = ("chestxray/**/*.py", "Model_Training/**/*.py", "*.py")


def project_files() -> list[Path]:
    return sorted({path for pattern in PATTERNS for path in ROOT.glob(pattern)})


def function_shapes(source: str, filename: str) -> list[tuple[str, int, int]]:
    """(name, lines, McCabe complexity) of every function and method in `source`; nested ones count on their own
    and inside the function that holds them, as mccabe counts them."""
    tree = ast.parse(source, filename)
    visitor = mccabe.PathGraphingAstVisitor()
    visitor.preorder(tree, visitor)
    complexity = {(graph.lineno, graph.entity.rsplit(".", 1)[-1]): graph.complexity()
                  for graph in visitor.graphs.values()}
    return [(node.name, node.end_lineno - node.lineno + 1, complexity.get((node.lineno, node.name), 1))
            for node in ast.walk(tree) if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)]


def offenders(limit_index: int, limit: int) -> list[str]:
    found = []
    for path in project_files():
        for name, lines, complexity in function_shapes(path.read_text(encoding="utf-8"), str(path)):
            value = (lines, complexity)[limit_index]
            if value > limit:
                found.append(f"{path.relative_to(ROOT)}: {name} ({value})")
    return found


def test_the_globs_find_the_package_the_scripts_and_the_entry_points():
    names = {str(path.relative_to(ROOT)) for path in project_files()}
    assert {"main.py", "predictions.py", "chestxray/predictor.py", "Model_Training/train.py"} <= names
    assert not any(name.startswith(("tests/", "benchmarks/")) for name in names)


def test_no_function_is_longer_than_80_lines():
    found = offenders(0, MAX_LINES)
    assert not found, f"split these into named steps (lines > {MAX_LINES}):\n" + "\n".join(found)


def test_no_function_is_more_complex_than_15():
    found = offenders(1, MAX_COMPLEXITY)
    assert not found, f"split these into named steps (McCabe complexity > {MAX_COMPLEXITY}):\n" + "\n".join(found)


@pytest.mark.parametrize(("body", "lines", "complexity"), [
    ("    return 1\n", 2, 1),
    ("".join(f"    x{i} = {i}\n" for i in range(90)), 91, 1),
    ("".join(f"    if x == {i}:\n        return {i}\n" for i in range(16)), 33, 17),
    ("    for y in x:\n        while y:\n            y -= 1\n    try:\n        pass\n    except ValueError:\n"
     "        pass\n", 8, 5),  # mccabe counts the loop, the inner loop and the try and its handler
])
def test_the_measure_counts_lines_and_branches(body, lines, complexity):
    shapes = function_shapes(f"def f(x):\n{body}\n\nclass C:\n    def m(self):\n        pass\n", "<test>")
    assert shapes[0] == ("f", lines, complexity)
    assert shapes[1] == ("m", 2, 1)  # a method is measured as well
