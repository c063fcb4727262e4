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
