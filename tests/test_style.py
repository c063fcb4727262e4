"""How the code reads (STYLE.md): ruff's formatter and linter, one skeleton in all five scripts,
copies that stay character-identical, and a `# Deviation:` comment for every README row."""

import ast
import importlib
import importlib.util
import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest

import common

ROOT = Path(common.__file__).parent
SCRIPTS = ["fixmatch", "spice", "odc", "picie", "cps"]
README_SECTIONS = {
    "fixmatch": "FixMatch",
    "spice": "SPICE",
    "odc": "ODC",
    "picie": "PiCIE",
    "cps": "CPS",
}


def ruff(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "ruff", *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True)


@pytest.mark.skipif(importlib.util.find_spec("ruff") is None, reason="ruff: the test extra")
@pytest.mark.parametrize("args", [("format", "--check", "."), ("check", ".")])
def test_ruff_finds_nothing(args):
    result = ruff(*args)
    assert result.returncode == 0, result.stdout + result.stderr


def test_no_line_over_100_columns():
    # Markdown is held to it outside its tables (a table row cannot wrap).
    files = [p for p in ROOT.glob("*.py")] + list((ROOT / "tests").glob("*.py"))
    files += [ROOT / "pyproject.toml", ROOT / ".ci" / "run", ROOT / ".gitignore"]
    long = []
    for path in files + [ROOT / "README.md"]:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if len(line) > 100 and not (path.suffix == ".md" and line.startswith("|")):
                long.append(f"{path.name}:{number}")
    assert not long, long


# --- One skeleton: the same banners, in the same order -------------------------------------------
BANNER = "# " + "-" * 98
SECTIONS = ["Arguments", "The paper's pieces", "The networks?", "Data", "Evaluation", "Training"]


def banner_titles(name: str) -> list[str]:
    lines = (ROOT / f"{name}.py").read_text().splitlines()
    titles = []
    for i, line in enumerate(lines[:-2]):
        if line == BANNER and lines[i + 2] == BANNER:
            titles.append(lines[i + 1].removeprefix("# "))
    return titles


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_script_has_the_same_sections_in_the_same_order(name):
    source = (ROOT / f"{name}.py").read_text()
    assert not re.search(r"^# ---.*\w.*---", source, re.M), "three-line banners only"
    keys = []
    for title in banner_titles(name):
        key = title.split(":")[0]
        if not keys or keys[-1] != key:  # SPICE's pieces come in three stages
            keys.append(key)
    assert len(keys) == len(SECTIONS), keys
    for key, pattern in zip(keys, SECTIONS, strict=True):
        assert re.fullmatch(pattern, key), (key, pattern)


@pytest.mark.parametrize("name", SCRIPTS)
def test_the_skeleton_names_are_where_the_banners_say(name):
    tree = ast.parse((ROOT / f"{name}.py").read_text())
    order = [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
    assert order[0] == "Args" and order[-2:] == ["train", "main"], order
    assert "evaluate" in order, "every script has an evaluate"
    assert order.index("evaluate") < order.index("train")
    assert ast.get_docstring(tree), "the module docstring comes first"


# --- Copies that stay copies (STYLE.md rule 13) --------------------------------------------------
COPIES = {  # name: the scripts that keep a character-identical copy of it
    "WideBlock": ["fixmatch", "spice"],
    "WideResNet": ["fixmatch", "spice"],
    "ema_update": ["fixmatch", "spice"],
    "fixmatch_loss": ["fixmatch", "spice"],
    "batch_indices": ["fixmatch", "cps"],
    "parameter_groups": ["fixmatch", "spice", "cps"],
    "cosine_lr": ["fixmatch", "spice"],
    "BasicBlock": ["odc", "spice"],
    "ResNet18": ["odc", "spice"],
    "network_outputs": ["odc", "spice"],
    "recompute_batch_norm": ["odc", "picie"],
    "imagenet_resnet": ["picie", "cps"],
}
# The skeleton's names: the same role in every script, its own content.
SKELETON = {
    "Args",
    "DATASET_DEFAULTS",
    "STREAMED",
    "load_split",
    "load_data",
    "evaluate",
    "predict",
}
SKELETON |= {"train_step", "train", "main"}


@pytest.mark.parametrize("name", sorted(COPIES))
def test_copies_are_character_identical(name):
    sources = {
        s: inspect.getsource(getattr(importlib.import_module(s), name)) for s in COPIES[name]
    }
    first = next(iter(sources.values()))
    assert all(source == first for source in sources.values()), f"{name} drifted: {list(sources)}"


def test_a_name_in_two_scripts_is_a_copy_or_the_skeleton():
    # Different things get different names: a reader who meets `batch_indices` in two files
    # may rely on it meaning the same.
    where = {}
    for name in SCRIPTS:
        for node in ast.parse((ROOT / f"{name}.py").read_text()).body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                where.setdefault(node.name, []).append(name)
            elif isinstance(node, ast.Assign):
                for target in node.targets:
                    if isinstance(target, ast.Name):
                        where.setdefault(target.id, []).append(name)
    shared = {n: s for n, s in where.items() if len(s) > 1 and n not in SKELETON}
    assert {n: sorted(s) for n, s in shared.items()} == {n: sorted(s) for n, s in COPIES.items()}


# --- Deviations on the spot, each with its README row --------------------------------------------
def readme_deviation_rows(section: str) -> list[str]:
    text = (ROOT / "README.md").read_text()
    match = re.search(rf"^## {re.escape(section)} \(`.*?`\)$(.*?)(?=^## )", text, re.M | re.S)
    assert match, section
    table = re.search(r"^### Deviations$(.*?)(?=^###? )", match.group(1), re.M | re.S)
    assert table, f"{section} has a Deviations table"
    rows = [line for line in table.group(1).splitlines() if line.startswith("|")]
    return rows[2:]  # less the header and its separator


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_deviation_row_has_its_comment_and_every_comment_its_row(name):
    comments = re.findall(r"# Deviation:", (ROOT / f"{name}.py").read_text())
    rows = readme_deviation_rows(README_SECTIONS[name])
    assert len(comments) == len(rows), (len(comments), len(rows))
