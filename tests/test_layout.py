"""docs/ARCHITECTURE.md's Layout section names every module, and every path it names exists, so it cannot drift."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ARCHITECTURE = ROOT / "docs" / "ARCHITECTURE.md"
INDENT = 2  # spaces per folder level in the layout block
ENTRY = re.compile(r"^(?P<indent> *)(?P<name>[\w.\-]+/?)(?:\s{2,}|$)")


def layout_block(text: str) -> list[str]:
    """The lines of the first code block after the '## Layout' heading."""
    section = text.split("\n## Layout\n", 1)[1]
    return section.split("```\n", 2)[1].splitlines()


def named_paths(lines: list[str]) -> list[str]:
    """Repository-relative paths named in a layout block ('chestxray/store/' etc.; folders end in '/').

    An entry is a name at an indentation of a whole number of levels, at most one level below the folder above it;
    a line indented further is the previous entry's description running on."""
    folders: list[str] = []
    paths = []
    for line in lines:
        match = ENTRY.match(line)
        depth, rest = divmod(len(match["indent"]), INDENT) if match else (0, 1)
        if not match or rest or depth > len(folders):
            continue
        del folders[depth:]
        path = "".join(folders) + match["name"]
        paths.append(path)
        if path.endswith("/"):
            folders.append(match["name"])
    return paths


def is_package(folder: Path) -> bool:
    return (folder / "__init__.py").is_file()


def modules() -> list[str]:
    """Every module and package: root *.py, chestxray/ and its subpackages (recursively), Model_Training/*.py."""
    found = [p.name for p in ROOT.glob("*.py")]
    found += [p.relative_to(ROOT).as_posix() for p in (ROOT / "Model_Training").glob("*.py")]
    for path in (ROOT / "chestxray").rglob("*"):
        if "__pycache__" in path.parts or not is_package(path.parent):
            continue  # not importable as part of the package (e.g. Alembic's migration scripts)
        if path.suffix == ".py" or (path.is_dir() and is_package(path)):
            found.append(path.relative_to(ROOT).as_posix() + ("/" if path.is_dir() else ""))
    return sorted(found)


PATHS = named_paths(layout_block(ARCHITECTURE.read_text()))


def test_the_parser_reads_nesting_and_skips_descriptions_that_run_on():
    block = ["a.py           one", "pkg/           two", "  b.py         three", "               more of three",
             "  sub/         four", "    c.py       five", "d/             six"]
    assert named_paths(block) == ["a.py", "pkg/", "pkg/b.py", "pkg/sub/", "pkg/sub/c.py", "d/"]


def test_the_module_list_sees_subpackages_and_skips_plain_folders():
    found = modules()
    assert {"main.py", "chestxray/imaging.py", "chestxray/store/", "Model_Training/train.py"} <= set(found)
    assert not [m for m in found if "/migrations/" in m]


@pytest.mark.parametrize("module", modules())
def test_every_module_is_named_in_the_layout(module):
    assert module in PATHS, f"{module} is missing from the Layout section of docs/ARCHITECTURE.md: add its line"


@pytest.mark.parametrize("path", PATHS)
def test_every_named_path_exists(path):
    assert (ROOT / path).exists(), f"docs/ARCHITECTURE.md's Layout names {path}, which does not exist"
    assert (ROOT / path).is_dir() == path.endswith("/"), f"{path}: a folder ends in '/', a file does not"


# ---------------------------------------------------------------------------------------------------------------
# The import graph: two entry points at the root, scripts that never import each other, a package that imports none

ENTRY_POINTS = sorted(["main.py", "predictions.py",
                       *(p.relative_to(ROOT).as_posix() for p in (ROOT / "Model_Training").glob("*.py")
                         if p.name != "__init__.py")])


def module_name(path: str) -> str:
    """'chestxray/web/views.py' -> 'chestxray.web.views'; a package's __init__.py is the package."""
    parts = path.removesuffix(".py").split("/")
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(source: str, module: str, is_package: bool = False) -> set[str]:
    """Every module an `import` or `from ... import` in `source` may load, as dotted names, relative ones resolved
    against `module`: `from a import b` counts as both a and a.b (b may be a submodule)."""
    import ast

    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module.split(".") if is_package else module.split(".")[:-1]
                anchor = package[: len(package) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def imports_of(path: str) -> set[str]:
    return imported_modules((ROOT / path).read_text(), module_name(path), path.endswith("__init__.py"))


def package_files() -> list[str]:
    return sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "chestxray").rglob("*.py")
                  if "__pycache__" not in p.parts and is_package(p.parent))


@pytest.mark.parametrize("source, module, expected", [
    ("import main", "chestxray.web", {"main"}),
    ("from Model_Training import demo", "chestxray.web.checkpoints", {"Model_Training", "Model_Training.demo"}),
    ("from Model_Training.train import main", "x", {"Model_Training.train", "Model_Training.train.main"}),
    ("from . import views", "chestxray.web.app", {"chestxray.web", "chestxray.web.views"}),
    ("from ..results import ResultStore", "chestxray.web.views", {"chestxray.results",
                                                                    "chestxray.results.ResultStore"}),
    ("def f():\n    import predictions\n", "chestxray.x", {"predictions"}),  # imports inside functions count too
])
def test_the_import_reader_sees_every_form_of_import(source, module, expected):
    assert imported_modules(source, module) == expected


def test_the_root_holds_no_module_but_the_two_entry_points():
    assert sorted(p.name for p in ROOT.glob("*.py")) == ["main.py", "predictions.py"], \
        "a module at the root: move it into the chestxray package (chestxray/web/, chestxray/pacs/, ...)"


def entry_point_imports(entry: str) -> set[str]:
    """The other entry points (as module names) that `entry` imports."""
    return imports_of(entry) & {module_name(other) for other in ENTRY_POINTS if other != entry}


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_no_entry_point_imports_another(entry):
    found = entry_point_imports(entry)
    assert not found, (f"{entry} imports {sorted(found)}: move what they share into chestxray/ (or run the other "
                       "script as a child process)")


@pytest.mark.parametrize("path", package_files())
def test_the_package_imports_no_entry_point(path):
    entries = {module_name(entry) for entry in ENTRY_POINTS} | {"Model_Training"}
    assert not imports_of(path) & entries, f"{path} imports an entry point: the package must not depend on a script"
