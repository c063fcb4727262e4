"""What every method script shares (STYLE.md, rule 1; DESIGN.md, Runs): the shared flags with the
same names, order, defaults and help, an importable module with no side effects, and `main`."""

import dataclasses
import importlib
from pathlib import Path

import pytest

import common

SCRIPTS = [
    name
    for name in ("fixmatch", "spice", "odc", "picie", "cps")
    if (Path(common.__file__).parent / f"{name}.py").exists()
]


@pytest.mark.parametrize("name", SCRIPTS)
def test_shared_flags(name):
    module = importlib.import_module(name)
    fields = [f.name for f in dataclasses.fields(module.Args)]
    shared = [f for f in fields if f in common.SHARED_ARGS]
    assert shared == list(common.SHARED_ARGS), "every shared flag, in DESIGN.md's order"
    assert fields[: len(shared)] == shared, "the shared flags come first"
    helps = common._field_help(module.Args)
    assert all(helps.get(f) for f in fields), "every flag has help text"
    for flag, text in common.SHARED_ARGS.items():
        if text is not None:
            assert helps[flag] == text, flag
    defaults = module.Args()
    assert (
        defaults.data_dir,
        defaults.out_dir,
        defaults.download,
        defaults.seed,
        defaults.device,
        defaults.resume,
        defaults.amp,
        defaults.compile,
    ) == (None, None, False, 0, "auto", False, True, False)
    assert callable(module.main) and callable(module.train)


def _outside(bound: str, edge, kind) -> list:
    """Values just outside one `common.arg` bound (for an int, the next integer past it)."""
    step = 1 if kind is int else 0.5
    return {"at_least": [edge - step], "above": [edge], "at_most": [edge + step], "below": [edge]}[
        bound
    ]


# Numeric flags that take any value: every other int or float flag states its range (common.arg).
UNBOUNDED = {"seed"}


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_flag_outside_its_range_is_refused_before_anything_is_written(name, tmp_path, capsys):
    module = importlib.import_module(name)
    hints = {f.name: f.type for f in dataclasses.fields(module.Args)}
    ranged = {
        f.name: f.metadata["range"]
        for f in dataclasses.fields(module.Args)
        if "range" in f.metadata
    }
    numeric = {n for n, t in hints.items() if t.split(" | ")[0] in ("int", "float")}
    assert numeric - UNBOUNDED == set(ranged), "every numeric flag states its valid range"
    out = tmp_path / "run"
    for field, bounds in ranged.items():
        kind = int if hints[field].startswith("int") else float
        flag = "--" + field.replace("_", "-")
        for bound, edge in bounds.items():
            for value in _outside(bound, edge, kind):
                with pytest.raises(SystemExit) as stop:
                    module.main(["--out-dir", str(out), flag, str(value)])
                assert stop.value.code == 2, (flag, value)
                assert f"argument {flag}: " in capsys.readouterr().err, (flag, value)
                assert not out.exists(), f"{flag} {value}: nothing may be written"


@pytest.mark.parametrize("name", SCRIPTS)
def test_help_names_the_data_sets_and_each_default_once(name, capsys):
    module = importlib.import_module(name)
    with pytest.raises(SystemExit):
        module.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    task = "segment" if name in ("picie", "cps") else "classify"
    names = [n for n, info in common.DATASETS.items() if info.task == task]
    assert "data sets (--dataset): " + ", ".join(names) in text
    for dataset, changes in module.DATASET_DEFAULTS.items():
        flag, value = next(iter(changes.items()))
        assert f"{dataset}: {common._as_flag(flag, value)}" in text
    data_dir_help = text.split("--data-dir STR ")[1]  # the option, past the usage line
    assert "(default: None)" not in data_dir_help.split("--out-dir")[0], "a default said once"
