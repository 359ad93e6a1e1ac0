"""Run one registry write and die by SIGKILL at a chosen point of it (the crash-safety tests' child).

Usage: ``python -m tests.kill_during_write ROOT OP WHERE``, from the repository root, with OP one of
add, update, merge, rollback, remove_task, remove_merge and WHERE one of
- ``mid-manifest``: the manifest's temp file gets half its bytes, then the process dies;
- ``before-manifest``: the version files are in place, the manifest is never written;
- ``after-manifest``: the manifest is replaced, nothing after it (the clean-up) runs.
Prints "not killed" if the write finished.
"""

import os
import signal
import sys

os.environ["HF_HUB_OFFLINE"] = "1"

from cmtl import Registry, TaskSpec, TrainConfig, store  # noqa: E402
from tests.conftest import toy_sentiment  # noqa: E402

real_write_manifest = store.write_manifest


def die_halfway(path, data):
    tmp = path.with_name(f".{path.name}.{'c' * 32}.tmp")  # the name write_bytes_atomic gives its temp files
    with open(tmp, "wb") as f:
        f.write(data[: len(data) // 2])
        f.flush()
        os.fsync(f.fileno())
    os.kill(os.getpid(), signal.SIGKILL)


def die_before(root, manifest):
    os.kill(os.getpid(), signal.SIGKILL)


def die_after(root, manifest):
    real_write_manifest(root, manifest)
    os.kill(os.getpid(), signal.SIGKILL)


def main(root: str, op: str, where: str) -> None:
    if where == "mid-manifest":
        store.write_bytes_atomic = die_halfway
    else:
        store.write_manifest = {"before-manifest": die_before, "after-manifest": die_after}[where]
    reg = Registry.open(root, device="cpu")
    steps = TrainConfig(max_steps=2, progress=False)
    {"add": lambda: reg.add_task(TaskSpec("second", labels=["neg", "pos"]), train=toy_sentiment(16), training=steps),
     "update": lambda: reg.update_task("sentiment", toy_sentiment(24, 5), training=steps),
     "merge": lambda: reg.merge(["sentiment", "topic"], "m2"),
     "rollback": lambda: reg.rollback("sentiment", 1),
     "remove_task": lambda: reg.remove_task("upper"),
     "remove_merge": lambda: reg.remove_merge("both")}[op]()
    print("not killed")


if __name__ == "__main__":
    main(*sys.argv[1:4])
