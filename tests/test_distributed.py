"""Data-parallel training: 2 CPU processes under torchrun (gloo) train the same adapter as one
process on the same global batches, and only rank 0 writes the registry."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

SCRIPT = Path(__file__).with_name("ddp_train.py")


def _run(cmd: list[str]) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]


def test_two_process_training_matches_one_process(tmp_path, tiny_backbone):
    _run([sys.executable, str(SCRIPT), tiny_backbone, str(tmp_path / "single"), str(tmp_path / "single")])
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(SCRIPT),
          tiny_backbone, str(tmp_path / "ddp"), str(tmp_path / "ddp")])
    single = torch.load(tmp_path / "single.rank0.pt")
    ranks = [torch.load(tmp_path / f"ddp.rank{r}.pt") for r in (0, 1)]
    assert single.keys() == ranks[0].keys() == ranks[1].keys()
    for key in single:
        torch.testing.assert_close(ranks[0][key], ranks[1][key], atol=0, rtol=0)  # ranks stay identical
        torch.testing.assert_close(ranks[0][key], single[key], atol=1e-4, rtol=1e-3)
    assert any(not torch.allclose(v, torch.zeros_like(v)) for k, v in single.items() if "lora_B" in k)
    manifest = json.loads((tmp_path / "ddp" / "registry.json").read_text())
    versions = manifest["tasks"]["sentiment"]["versions"]
    assert [v["version"] for v in versions] == [1] and manifest["generation"] == 2  # created, then one write
    assert sorted(p.name for p in (tmp_path / "ddp" / "tasks" / "sentiment").iterdir()) == ["v1"]
    assert versions[0]["training"]["steps"] == 24  # ceil(61 / 8) = 8 global steps per epoch, 3 epochs
