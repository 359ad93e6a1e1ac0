"""Old module paths (cmtl 0.1's flat layout), kept importable for one release.

``import cmtl.registry`` still works, being a package now; the modules that became part of a
package (``cmtl.backbone`` → ``cmtl.core.backbone``, …) are served by a finder that warns with a
DeprecationWarning and hands out the new module itself, so both names refer to one module object.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

#: Removed in the release after 0.2.
MOVED = {
    "cmtl.backbone": "cmtl.core.backbone",
    "cmtl.tasks": "cmtl.core.tasks",
    "cmtl.adapters": "cmtl.core.adapters",
    "cmtl.evaluation": "cmtl.training.evaluation",
    "cmtl.caching": "cmtl.training.caching",
    "cmtl.distributed": "cmtl.training.distributed",
    "cmtl.replay": "cmtl.continual.replay",
    "cmtl.penalties": "cmtl.continual.penalties",
    "cmtl.updates": "cmtl.continual.updates",
    "cmtl.manifest": "cmtl.registry.manifest",
    "cmtl.store": "cmtl.registry.store",
    "cmtl.monitor": "cmtl.monitoring.drift",
    "cmtl.engine": "cmtl.serving.engine",
    "cmtl.server": "cmtl.serving.server",
    "cmtl.demo": "cmtl.cli.demo",
    "cmtl.corpora": "cmtl.benchmarks.corpora",
    "cmtl.scenarios": "cmtl.benchmarks.scenarios",
    "cmtl.strategies": "cmtl.benchmarks.learners",
    "cmtl.metrics": "cmtl.benchmarks.metrics",
    "cmtl.benchmark": "cmtl.benchmarks.runner",
}


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        if name not in MOVED:
            return None
        return importlib.util.spec_from_loader(name, self)

    def create_module(self, spec):
        new = MOVED[spec.name]
        # stacklevel 2 is the import statement: warnings skips importlib's own frames.
        warnings.warn(f"{spec.name} moved to {new}; the old path is removed in the next release.",
                      DeprecationWarning, stacklevel=2)
        return importlib.import_module(new)

    def exec_module(self, module):
        pass  # the module returned by create_module is already executed


def install() -> None:
    if not any(isinstance(f, _Alias) for f in sys.meta_path):
        sys.meta_path.append(_Alias())
