"""torchrun --nproc_per_node 2 on CPU (gloo) trains the same weights as one process on the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file
from test_train import TINY, write_task

from petl_zoo.train import main

REPO = Path(__file__).resolve().parents[1]


def args(data_root: Path, out: Path) -> list[str]:
    # drop_path 0 and no augmentation: no randomness that differs between one and two processes
    return [
        "--method", "lora", "--model", "vit_tiny_patch16_224", "--model-kwargs", *TINY, "--no-pretrained",
        "--task", "synth", "--data-root", str(data_root), "--out", str(out), "--device", "cpu",
        "--epochs", "2", "--batch-size", "8", "--warmup-epochs", "1", "--eval-every", "1", "--lr", "3e-3",
        "--protocol", "default", "--drop-path", "0", "--no-progress",
    ]  # fmt: skip


def test_torchrun_two_processes_match_one_process(tmp_path):
    data_root = write_task(tmp_path / "vtab")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.run(
        [*launcher, str(REPO / "tools" / "train.py"), *args(data_root, tmp_path / "ddp")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert main(args(data_root, tmp_path / "single")) == 0

    ddp = json.loads((tmp_path / "ddp" / "result.json").read_text())
    single = json.loads((tmp_path / "single" / "result.json").read_text())
    assert ddp["world_size"] == 2 and single["world_size"] == 1
    config = json.loads((tmp_path / "ddp" / "config.json").read_text())
    assert config["per_rank_batch_size"] == 4 and config["recipe"]["batch_size"] == 8
    a, b = (
        load_file(str(tmp_path / "ddp" / "adapter.safetensors")),
        load_file(str(tmp_path / "single" / "adapter.safetensors")),
    )
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=0), (k, (a[k] - b[k]).abs().max())
    assert a["blocks.1.attn.qkv.deltas.lora_v.lora_B"].abs().max() > 1e-4  # trained, not trivially equal
    # sharded evaluation sums the ranks' counts: same accuracy on the 12 test images
    assert ddp["test_acc_last"] == single["test_acc_last"]
    metrics = [json.loads(line) for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2  # only rank 0 writes
