"""Old flat module paths (cmtl 0.1) still import, warn, and are the new modules themselves."""

import importlib
import json
import subprocess
import sys

import pytest

from cmtl._moved import MOVED

# In a fresh interpreter (an import already done in this process would not warn again): import each
# old path with DeprecationWarnings recorded; report the warning and whether it is the new module.
CHECK = """
import importlib, json, warnings
from cmtl._moved import MOVED
out = {}
for old, new in MOVED.items():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = importlib.import_module(old)
    out[old] = {"warnings": [str(w.message) for w in caught if w.category is DeprecationWarning],
                "same": module is importlib.import_module(new)}
print(json.dumps(out))
"""


def test_every_old_path_warns_once_and_is_the_new_module():
    out = json.loads(subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True,
                                    check=True).stdout)
    assert sorted(out) == sorted(MOVED)
    for old, new in MOVED.items():
        assert out[old]["same"], old
        assert out[old]["warnings"] == [f"{old} moved to {new}; the old path is removed in the next release."]


def test_names_imported_from_an_old_path_are_the_new_objects():
    sys.modules.pop("cmtl.strategies", None)
    with pytest.warns(DeprecationWarning, match="cmtl.strategies moved to cmtl.benchmarks.learners"):
        from cmtl.strategies import StrategyConfig
    from cmtl.benchmarks.learners import StrategyConfig as new

    assert StrategyConfig is new


def test_an_unknown_old_name_still_fails():
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("cmtl.no_such_module")
