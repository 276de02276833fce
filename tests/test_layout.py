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
