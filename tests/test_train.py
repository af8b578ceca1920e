"""tools/train.py and tools/eval.py on tiny models and a tiny synthetic VTAB folder (in-process, CPU)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

import petl_zoo
from petl_zoo.config import MethodConfig
from petl_zoo.layers import LinearDelta, adapt_linear
from petl_zoo.registry import Method, register_method
from petl_zoo.targets import linear_sites
from petl_zoo.train import (
    WarmupCosine,
    WeightsUnavailableError,
    build_backbone,
    eval_main,
    evaluate,
    main,
    resolve_recipe,
)

TINY = ["img_size=32", "patch_size=8", "depth=2", "embed_dim=48", "num_heads=3"]
TINY_KW = dict(img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=3)
NUM_CLASSES = 3


# ------------------------------------------------------------------------------------------- data
def write_task(root: Path, task: str = "synth", sizes=(16, 8, 12), seed: int = 0) -> Path:
    """``<root>/<task>/{train800,val200,train800val200,test}.txt`` over small PNGs: class c brightens a
    vertical band, so the classes are learnable."""
    rng = np.random.default_rng(seed)
    folder = root / task
    (folder / "images").mkdir(parents=True, exist_ok=True)

    def make(n: int, name: str) -> list[str]:
        lines = []
        for i in range(n):
            label = i % NUM_CLASSES
            img = rng.integers(0, 80, (32, 32, 3)).astype(np.uint8)
            img[:, label * 10 : label * 10 + 10] += 140
            rel = f"images/{name}_{i}.png"
            Image.fromarray(img).save(folder / rel)
            lines.append(f"{rel} {label}")
        return lines

    train, val, test = make(sizes[0], "train"), make(sizes[1], "val"), make(sizes[2], "test")
    for name, lines in {
        "train800.txt": train,
        "val200.txt": val,
        "train800val200.txt": train + val,
        "test.txt": test,
    }.items():
        (folder / name).write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return write_task(tmp_path_factory.mktemp("vtab"))


def base_args(data_root: Path, out: Path, *extra: str, method: str = "lora") -> list[str]:
    return [
        "--method", method,
        "--model", "vit_tiny_patch16_224",
        "--model-kwargs", *TINY,
        "--no-pretrained",
        "--task", "synth",
        "--data-root", str(data_root),
        "--out", str(out),
        "--epochs", "3",
        "--batch-size", "8",
        "--warmup-epochs", "1",
        "--eval-every", "1",
        "--lr", "3e-3",
        "--protocol", "default",
        "--augment",  # RNG in the data path (workers=0: the main process's torch RNG)
        "--drop-path", "0.1",  # RNG in the model
        "--no-progress",
        *extra,
    ]  # fmt: skip


def read(out: Path, name: str):
    text = (out / name).read_text()
    if name.endswith(".jsonl"):
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    return json.loads(text)


def adapter_tensors(out: Path) -> dict[str, Tensor]:
    return load_file(str(out / "adapter.safetensors"))


def assert_same_tensors(a: dict[str, Tensor], b: dict[str, Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


ACC_KEYS = ("test_acc_best", "best_epoch", "test_acc_last", "test_acc_selected", "val_acc_best")


@pytest.fixture(scope="module")
def reference_run(data_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "ref"
    assert main(base_args(data_root, out)) == 0
    return out


# ---------------------------------------------------------------------------------- the main path
def test_run_writes_every_file(reference_run, capsys):
    out = reference_run
    for name in ("config.json", "metrics.jsonl", "adapter.safetensors", "adapter_config.json", "result.json"):
        assert (out / name).is_file(), name
    assert not (out / "last.pt").exists()  # removed at the end (--keep-checkpoint keeps it)
    result, config, metrics = read(out, "result.json"), read(out, "config.json"), read(out, "metrics.jsonl")
    required = {
        "method", "model", "task", "seed", "num_classes", "method_config", "select_on", "test_acc_best",
        "best_epoch", "test_acc_last", "test_acc_selected", "val_acc_best", "epochs", "trainable_params",
        "train_time_s", "img_per_s", "peak_mem_mb", "precision", "world_size",
    }  # fmt: skip
    assert required <= set(result)
    assert result["method"] == "lora" and result["task"] == "synth" and result["num_classes"] == NUM_CLASSES
    assert result["method_config"] == {"rank": 8, "alpha": None, "dropout": 0.0, "targets": ["q", "v"]}
    assert result["precision"] == "fp32" and result["world_size"] == 1 and result["epochs"] == 3
    # 2 blocks x (q, v) x rank 8 x (48 + 48) and a 48 x 3 + 3 head
    assert result["trainable_params"]["method"] == 2 * 2 * 8 * 96
    assert result["trainable_params"]["head"] == 48 * 3 + 3
    assert [m["epoch"] for m in metrics] == [1, 2, 3]
    assert all({"epoch", "split", "train_loss", "lr", "img_per_s", "test_acc"} <= set(m) for m in metrics)
    accs = [m["test_acc"] for m in metrics]
    assert result["test_acc_best"] == max(accs) and result["test_acc_last"] == accs[-1]
    assert metrics[accs.index(max(accs))]["epoch"] == result["best_epoch"]
    assert result["test_acc_selected"] == result["test_acc_best"] and result["val_acc_best"] is None
    assert all(0.0 <= a <= 1.0 for a in accs)
    trained = adapter_tensors(out)
    assert trained["blocks.0.attn.qkv.deltas.lora_q.lora_B"].abs().sum() > 0  # LoRA B starts at zero
    recipe = config["recipe"]
    for key in ("seed", "protocol", "precision", "select_on", "epochs", "lr", "batch_size", "weight_decay",
                "warmup_epochs", "eval_every", "drop_path"):  # fmt: skip
        assert key in recipe, key
    assert recipe["lr"] == 3e-3 and recipe["weight_decay"] == 1e-4 and recipe["protocol"] == "default"
    assert (
        config["recipe_sources"]["lr"] == "flag" and config["recipe_sources"]["weight_decay"] == "recipe:vtab"
    )
    assert config["method_options"]["targets"] == ["q", "v"] and config["model_kwargs"]["depth"] == 2
    assert config["argv"][0] == "tools/train.py" and "--method" in config["argv"]
    assert read(out, "adapter_config.json")["method"] == "lora"


def test_same_seed_gives_identical_runs(reference_run, data_root, tmp_path):
    assert main(base_args(data_root, tmp_path / "again")) == 0
    a, b = read(reference_run, "result.json"), read(tmp_path / "again", "result.json")
    assert [a[k] for k in ACC_KEYS] == [b[k] for k in ACC_KEYS]
    assert_same_tensors(adapter_tensors(reference_run), adapter_tensors(tmp_path / "again"))
    assert main(base_args(data_root, tmp_path / "seed1", "--seed", "1")) == 0
    other = adapter_tensors(tmp_path / "seed1")
    assert not torch.equal(other["head.weight"], adapter_tensors(reference_run)["head.weight"])


def test_kill_and_resume_matches_uninterrupted_run(reference_run, data_root, tmp_path, capsys):
    out = tmp_path / "killed"
    assert main(base_args(data_root, out, "--stop-after-epoch", "1")) == 137
    assert (out / "last.pt").is_file() and not (out / "result.json").exists()
    assert len(read(out, "metrics.jsonl")) == 1
    # a plain rerun refuses to clobber it; another lr is refused on resume
    assert main(base_args(data_root, out)) != 0
    assert "--resume" in capsys.readouterr().err
    assert main(base_args(data_root, out, "--resume", "--lr", "1e-2")) != 0
    assert "lr" in capsys.readouterr().err
    capsys.readouterr()
    assert main(base_args(data_root, out, "--resume")) == 0
    shown = capsys.readouterr().out.splitlines()  # the trainer's log lines, as plain text on stdout
    assert shown[0] == f"resuming {out} after epoch 1/3" and shown[1].startswith(
        "lora on vit_tiny_patch16_224"
    )
    assert [line.split("  ")[0] for line in shown[2:4]] == ["[eval] epoch 2/3", "[eval] epoch 3/3"]
    assert shown[-1].startswith("done: test acc best") and shown[-1].endswith(f"wrote {out}")
    ref, got = read(reference_run, "result.json"), read(out, "result.json")
    assert [ref[k] for k in ACC_KEYS] == [got[k] for k in ACC_KEYS]
    assert got["resumed_from_epoch"] == 1
    assert_same_tensors(adapter_tensors(reference_run), adapter_tensors(out))
    strip = [
        {k: v for k, v in m.items() if k not in ("img_per_s", "time_s")} for m in read(out, "metrics.jsonl")
    ]
    ref_m = [
        {k: v for k, v in m.items() if k not in ("img_per_s", "time_s")}
        for m in read(reference_run, "metrics.jsonl")
    ]
    assert strip == ref_m
    assert not (out / "last.pt").exists()
    assert main(base_args(data_root, out, "--resume")) != 0  # finished: nothing to resume
    assert "already finished" in capsys.readouterr().err


@pytest.mark.slow  # three subprocesses that import torch and timm, one trains an epoch
def test_python_dash_m_runs_the_trainer_and_the_evaluator(data_root, tmp_path):
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(repo))

    def run(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", *argv], cwd=tmp_path, env=env, capture_output=True, text=True
        )

    out = tmp_path / "dash_m"
    train = run(
        "petl_zoo.train", *base_args(data_root, out, "--epochs", "1", "--augment", "--keep-checkpoint")
    )
    assert train.returncode == 0, train.stderr[-2000:]
    assert train.stdout.splitlines()[-1].startswith("done: test acc best")  # the log lines on stdout
    assert read(out, "config.json")["argv"][:4] == ["python", "-m", "petl_zoo.train", "--method"]
    torch.load(out / "last.pt", weights_only=True)
    bad = run("petl_zoo.train", "--method", "lora", "--task", "synth", "--precision", "fp8")
    assert bad.returncode == 2 and "(see python -m petl_zoo.train --help)" in bad.stderr
    evaluated = run("petl_zoo.train.eval", "--adapter", str(out), "--no-progress", "--check")
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    assert "accuracy" in evaluated.stdout and "matches" in evaluated.stdout
    assert "RuntimeWarning" not in evaluated.stderr


def _eval_acc(capsys, argv: list[str]) -> tuple[int, float, str]:
    capsys.readouterr()
    rc = eval_main(argv)
    line = capsys.readouterr().out.strip().splitlines()[-1]
    acc = float(line.split("accuracy ")[1].split()[0])
    return rc, acc, line


def test_eval_reproduces_last_accuracy_plain_and_merged(reference_run, capsys):
    result = read(reference_run, "result.json")
    rc, acc, line = _eval_acc(capsys, ["--adapter", str(reference_run), "--no-progress", "--check"])
    assert rc == 0 and "matches" in line
    correct, total = map(int, line.split("(")[1].split(")")[0].split("/"))
    assert correct / total == result["test_acc_last"]
    rc, merged, line = _eval_acc(
        capsys, ["--adapter", str(reference_run), "--no-progress", "--merge", "--check"]
    )
    assert rc == 0 and "(merged)" in line
    assert abs(merged - result["test_acc_last"]) * total <= 1 + 1e-9


def test_select_on_val_saves_and_reports_the_selected_epoch(data_root, tmp_path, capsys):
    out = tmp_path / "val"
    assert main(base_args(data_root, out, "--select-on", "val", "--epochs", "4", "--lr", "1e-2")) == 0
    result, metrics = read(out, "result.json"), read(out, "metrics.jsonl")
    assert all(m["split"] == "train" and "val_acc" in m for m in metrics)
    vals = [m["val_acc"] for m in metrics]
    chosen = metrics[vals.index(max(vals))]
    assert result["select_on"] == "val" and result["val_acc_best"] == max(vals)
    assert result["selected_epoch"] == chosen["epoch"] and result["test_acc_selected"] == chosen["test_acc"]
    assert result["test_acc_best"] == max(m["test_acc"] for m in metrics)
    assert result["test_acc_last"] == metrics[-1]["test_acc"]
    rc, acc, line = _eval_acc(capsys, ["--adapter", str(out), "--no-progress", "--check"])
    assert (
        rc == 0
        and "test_acc_selected" in line
        and acc == pytest.approx(result["test_acc_selected"], abs=1e-4)
    )


def test_no_test_scores_val_only_and_trains_the_same(data_root, tmp_path, capsys):
    """A tuning grid point (--no-test) never evaluates test, and trains exactly as with test evaluations."""
    runs = {}
    for name, extra in (("with", ()), ("without", ("--no-test",))):
        out = tmp_path / name
        assert main(base_args(data_root, out, "--select-on", "val", "--epochs", "2", *extra)) == 0
        runs[name] = (
            read(out, "result.json"),
            read(out, "metrics.jsonl"),
            load_file(out / "adapter.safetensors"),
        )
    (res_t, met_t, ada_t), (res_n, met_n, ada_n) = runs["with"], runs["without"]
    assert [m["val_acc"] for m in met_n] == [m["val_acc"] for m in met_t]
    assert all("test_acc" not in m for m in met_n) and all("test_acc" in m for m in met_t)
    assert res_n["val_acc_last"] == res_t["val_acc_last"] and res_n["test_acc_last"] is None
    assert res_n["test_acc_best"] is None and res_n["test_acc_selected"] is None
    assert all(torch.equal(ada_n[k], ada_t[k]) for k in ada_t)
    assert "no test" in capsys.readouterr().out
    assert main(base_args(data_root, tmp_path / "bad", "--no-test")) == 1
    assert capsys.readouterr().err == (
        "error: --no-test needs --select-on val: without test or val nothing would be evaluated\n"
    )


# --------------------------------------------------------------------- callbacks, structure, NaN
@dataclass
class ToyPruneConfig(MethodConfig):
    """A low-rank fc2 update whose rank is halved after ``prune_epoch`` (a stand-in for pruning)."""

    rank: int = 4
    prune_epoch: int = 0
    nan_at_epoch: int = -1


class ToyDelta(LinearDelta):
    """``delta(x) = s * (x A^T) B^T`` with a scale ``s`` that is frozen when the rank is pruned."""

    mergeable = True

    def __init__(self, in_features: int, out_features: int, rank: int) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.randn(rank, in_features) * 0.1)
        self.B = nn.Parameter(torch.zeros(out_features, rank))
        self.s = nn.Parameter(torch.ones(()))

    def forward(self, x: Tensor, weight: Tensor) -> Tensor:
        return (x @ self.A.t() @ self.B.t()) * self.s

    def delta_weight(self, weight: Tensor) -> Tensor:
        return self.B @ self.A * self.s


@register_method("test_toy_prune", "test-only: low-rank fc2 update pruned to half rank after an epoch")
class ToyPrune(Method):
    config_class = ToyPruneConfig
    recipe = {"weight_decay": 0.0}

    def __init__(self, config):
        super().__init__(config)
        self.rank = config.rank
        self.calls = {"start": 0, "backward": 0, "epoch_end": []}
        self.start_batches = 0

    def deltas(self, model):
        return [m for m in model.modules() if isinstance(m, ToyDelta)]

    def apply(self, model):
        for site in linear_sites(model, "fc2"):
            adapt_linear(site).add_delta(
                "toy", ToyDelta(site.in_features, site.out_features, self.rank), 0, site.out_features
            )

    def get_state(self):
        return {"rank": self.rank}

    def set_state(self, model, state):
        if state.get("rank", self.config.rank) != self.rank:
            self._prune(model, state["rank"])

    def _prune(self, model, rank):
        for d in self.deltas(model):
            d.A = nn.Parameter(d.A.detach()[:rank].clone())
            d.B = nn.Parameter(d.B.detach()[:, :rank].clone())
            d.s.requires_grad_(False)
        self.rank = rank

    def on_train_start(self, model, loader, ctx):
        self.calls["start"] += 1
        self.start_batches = sum(1 for _ in loader)

    def on_after_backward(self, model, ctx):
        self.calls["backward"] += 1
        assert all(d.A.grad is not None for d in self.deltas(model))
        if ctx.epoch == self.config.nan_at_epoch:
            with torch.no_grad():
                model.get_classifier().weight.fill_(float("nan"))

    def on_epoch_end(self, model, epoch, ctx):
        self.calls["epoch_end"].append(epoch)
        if epoch == self.config.prune_epoch:
            self._prune(model, self.rank // 2)


def toy_args(data_root, out, *extra):
    return base_args(data_root, out, "--epochs", "2", "--keep-checkpoint", *extra, method="test_toy_prune")


def test_callbacks_structure_change_and_resume(data_root, tmp_path, monkeypatch):
    created = []
    original = petl_zoo.api.create

    def spy(name, model, **options):
        model = original(name, model, **options)
        created.append(model.petl_method)
        return model

    monkeypatch.setattr("petl_zoo.train.loop.create", spy)
    out = tmp_path / "toy"
    assert main(toy_args(data_root, out)) == 0
    method = created[-1]
    steps = 3  # 24 trainval images / batch 8
    assert method.calls == {"start": 1, "backward": 2 * steps, "epoch_end": [0, 1]}
    assert method.start_batches == steps
    # rank pruned 4 -> 2 after epoch 1 (0-based 0): saved adapter has the pruned shapes
    tensors = adapter_tensors(out)
    assert tensors["blocks.0.mlp.fc2.deltas.toy.A"].shape[0] == 2
    assert read(out, "adapter_config.json")["state"] == {"rank": 2}
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert "blocks.0.mlp.fc2.deltas.toy.s" not in ckpt["trainable"]  # frozen by the prune
    # the optimizer was rebuilt with the AdamW state of the surviving head carried over (step count)
    names = ckpt["trainable"]
    head = names.index("head.weight")
    assert ckpt["optimizer"]["state"][head]["step"].item() == 2 * steps
    new_A = names.index("blocks.0.mlp.fc2.deltas.toy.A")
    assert ckpt["optimizer"]["state"][new_A]["step"].item() == steps  # new tensor: fresh state
    assert ckpt["config"]["recipe"]["weight_decay"] == 0.0  # the method's recipe override
    assert ckpt["config"]["recipe_sources"]["weight_decay"] == "method:test_toy_prune"

    # kill after epoch 1 and resume: set_state rebuilds the pruned shapes before loading tensors
    killed = tmp_path / "toy_killed"
    assert main(toy_args(data_root, killed, "--stop-after-epoch", "1")) == 137
    s_at_prune = torch.load(killed / "last.pt", weights_only=True)["model"]["blocks.0.mlp.fc2.deltas.toy.s"]
    assert main(toy_args(data_root, killed, "--resume")) == 0
    assert created[-1].calls["start"] == 0  # not called on resume
    assert_same_tensors(tensors, adapter_tensors(killed))
    assert torch.equal(tensors["blocks.0.mlp.fc2.deltas.toy.s"], s_at_prune)  # frozen: not trained after
    assert [read(out, "result.json")[k] for k in ACC_KEYS] == [
        read(killed, "result.json")[k] for k in ACC_KEYS
    ]
    # and eval.py rebuilds the pruned structure from adapter_config.json
    assert eval_main(["--adapter", str(out), "--no-progress", "--check"]) == 0


def test_nan_loss_stops_and_keeps_last_good_checkpoint(data_root, tmp_path, capsys):
    out = tmp_path / "nan"
    assert main(toy_args(data_root, out, "--opt", "nan_at_epoch=1", "--opt", "prune_epoch=5")) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: loss is nan at epoch 2 step 2/3") and "\n" not in err
    assert "last.pt" in err
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 1 and all(torch.isfinite(t).all() for t in ckpt["model"].values())
    assert not (out / "result.json").exists()


# --------------------------------------------------------------------------------- option handling
def test_options_from_file_and_flags(data_root, tmp_path):
    cfg = tmp_path / "opts.yaml"
    cfg.write_text("rank: 2\ntargets: [q, k, v]\nalpha: 4\n")
    out = tmp_path / "opts"
    args = base_args(data_root, out, "--method-config", str(cfg), "--opt", "targets=q,v", "--epochs", "1")
    assert main(args) == 0
    config = read(out, "config.json")
    assert config["method_options"] == {"rank": 2, "alpha": 4.0, "dropout": 0.0, "targets": ["q", "v"]}
    assert read(out, "result.json")["trainable_params"]["method"] == 2 * 2 * 2 * 96
    # --overwrite replaces the run
    assert main(base_args(data_root, out, "--epochs", "1", "--overwrite")) == 0
    assert read(out, "config.json")["method_options"]["rank"] == 8


@pytest.mark.parametrize(
    "change, needle",
    [
        (["--method", "lorra"], "unknown method 'lorra' (did you mean lora"),
        (["--opt", "rnak=4"], "unknown option 'rnak'"),
        (["--opt", "rank=four"], "bad value 'four' for option 'rank'"),
        (["--opt", "rank"], "is not KEY=VALUE"),
        (["--model", "vit_tiny_patch16_2244"], "unknown timm model"),
        (["--task", "no_such_task"], "no_such_task"),
        (["--batch-size", "0"], "batch-size 0 is invalid"),
        (["--warmup-epochs", "9"], "warmup-epochs 9 is invalid"),
        (["--precision", "fp8"], "invalid choice: 'fp8'"),
        (["--model-kwargs", "depht=2"], "does not accept"),
        (["--pretrained-file", "/nonexistent/ViT-B_16.npz"], "/nonexistent/ViT-B_16.npz"),
    ],
)
def test_user_errors_are_one_line(data_root, tmp_path, capsys, change, needle):
    args = base_args(data_root, tmp_path / "x", "--epochs", "1")
    if change[0] in ("--method", "--model", "--task"):
        i = args.index(change[0])
        args[i + 1] = change[1]
    elif change[0] == "--pretrained-file":
        args.remove("--no-pretrained")
        args += change
    else:
        args += change
    rc = main(args)
    err = capsys.readouterr().err.strip()
    assert rc != 0
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    assert needle in err, err
    assert not (tmp_path / "x" / "result.json").exists()


def test_recipe_resolution_and_schedule():
    recipe, sources = resolve_recipe(
        "vtab", {"lr": 5e-3, "epochs": 50}, {"epochs": 20, "lr": None}, method="m"
    )
    assert recipe["lr"] == 5e-3 and sources["lr"] == "method:m"
    assert recipe["epochs"] == 20 and sources["epochs"] == "flag"
    assert (recipe["batch_size"], recipe["weight_decay"], recipe["warmup_epochs"]) == (64, 1e-4, 10)
    assert (recipe["drop_path"], recipe["protocol"], recipe["eval_every"]) == (0.1, "default", 10)
    with pytest.raises(ValueError, match="unknown recipe key 'lrr'"):
        resolve_recipe("vtab", {"lrr": 1.0}, {})
    with pytest.raises(ValueError, match="lr -1"):
        resolve_recipe("vtab", None, {"lr": -1.0})
    s = WarmupCosine(lr=1e-3, total_steps=100, warmup_steps=10, warmup_lr=1e-6, min_lr=1e-5)
    lrs = [s(i) for i in range(100)]
    assert lrs[0] == pytest.approx(1e-6) and lrs[10] == pytest.approx(1e-3)
    assert lrs[5] == pytest.approx(1e-6 + (1e-3 - 1e-6) / 2)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11]))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[55] == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + math.cos(math.pi * 45 / 90)))
    assert 1e-5 < lrs[-1] < 1.1e-5


def _reference_lr(lr, total, warmup, warmup_lr, min_lr, step):
    """The schedule as the trainer has always computed it (the reference the trainer must keep)."""
    if step < warmup:
        return warmup_lr + (lr - warmup_lr) * step / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * t))


# (epochs, steps per epoch, warmup epochs, lr): the vtab recipe on 1000 and 800 images, short runs
SCHEDULES = [
    (100, 16, 10, 1e-3),
    (100, 13, 10, 1e-3),
    (3, 13, 1, 3e-3),
    (50, 4, 5, 5e-3),
    (100, 16, 0, 1e-3),
    (4, 3, 4, 1e-2),
]


@pytest.mark.parametrize("epochs, steps, warmup_epochs, lr", SCHEDULES)
def test_schedule_is_bit_exact_and_timm_cosine_agrees(epochs, steps, warmup_epochs, lr):
    from timm.optim import create_optimizer_v2
    from timm.scheduler import CosineLRScheduler

    total, warmup = epochs * steps, warmup_epochs * steps
    ours = WarmupCosine(lr, total, warmup, 1e-6, 1e-5)
    param = nn.Parameter(torch.zeros(2))
    opt = create_optimizer_v2([param], "adamw", lr=lr, weight_decay=1e-4)
    timm_s = CosineLRScheduler(
        opt, t_initial=max(1, total - warmup), lr_min=1e-5, warmup_t=warmup, warmup_lr_init=1e-6,
        warmup_prefix=True, t_in_epochs=False,
    )  # fmt: skip
    for step in range(total):
        expected = _reference_lr(lr, total, warmup, 1e-6, 1e-5, step)
        assert ours(step) == expected, step  # exactly: runs repeat earlier ones bit for bit
        timm_s.step_update(step)
        got = opt.param_groups[0]["lr"]
        assert abs(got - expected) <= 1e-12 * expected, (step, got, expected)  # the same schedule


def test_optimizer_is_torch_adamw_over_trainable_tensors_carrying_state():
    from petl_zoo.train.state import build_optimizer

    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    model[0].bias.requires_grad_(False)
    opt = build_optimizer(model, 1e-3, 1e-4)
    assert type(opt) is torch.optim.AdamW and len(opt.param_groups) == 1
    assert (
        opt.defaults == torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=1e-3, weight_decay=1e-4).defaults
    )
    assert [id(p) for p in opt.param_groups[0]["params"]] == [
        id(model[0].weight),
        id(model[1].weight),
        id(model[1].bias),
    ]
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    model[0].weight.requires_grad_(False)  # the trainable set changes: surviving tensors keep their state
    rebuilt = build_optimizer(model, 1e-3, 1e-4, previous=opt)
    assert rebuilt.state[model[1].weight] is opt.state[model[1].weight]
    assert model[0].weight not in rebuilt.state


def test_rng_states_survive_a_weights_only_file(tmp_path):
    import random

    from petl_zoo.train.checkpoint import capture_rng, load_checkpoint, restore_rng, save_checkpoint

    random.seed(3), np.random.seed(3), torch.manual_seed(3)
    random.gauss(0, 1), np.random.standard_normal()  # pending gaussians are part of the states
    save_checkpoint(tmp_path / "last.pt", {"rng": capture_rng()})

    def draw():
        return (
            random.random(),
            random.gauss(0, 1),
            np.random.random(3).tolist(),
            np.random.standard_normal(),
            torch.rand(3),
        )

    first = draw()
    restore_rng(load_checkpoint(tmp_path / "last.pt")["rng"])
    again = draw()
    assert first[:4] == again[:4] and torch.equal(first[4], again[4])


class _RunsCode:
    """Unpickling this calls os.system: what a tampered last.pt could do under weights_only=False."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def _tampered(path: Path, marker: Path) -> None:
    torch.save({"version": 2, "config": {}, "epoch": 1, "payload": _RunsCode(marker)}, path)


def _truncated(path: Path, marker: Path) -> None:
    torch.save({"version": 2, "model": {"w": torch.randn(256, 256)}}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _old_format(path: Path, marker: Path) -> None:  # version 1 kept numpy's RNG state (a numpy array)
    torch.save({"version": 1, "rng": {"numpy": np.random.get_state()}}, path)


@pytest.mark.parametrize(
    "write, needle",
    [
        (_tampered, "holds objects other than tensors and plain values (posix.system)"),
        (_truncated, "truncated or corrupt"),
        (_old_format, "holds objects other than tensors and plain values (numpy"),
    ],
)
def test_unsafe_or_broken_checkpoint_is_refused_in_one_line(data_root, tmp_path, capsys, write, needle):
    out, marker = tmp_path / "run", tmp_path / "code_ran"
    out.mkdir()
    write(out / "last.pt", marker)
    assert main(base_args(data_root, out, "--resume")) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and str(out / "last.pt") in err, err
    assert needle in err, err
    assert "--overwrite" in err
    assert not marker.exists()  # nothing in the file was run
    assert not (out / "config.json").exists()


def test_evaluate_counts_top1():
    class Fixed(nn.Module):
        def forward(self, x):
            return x

    logits = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([0, 1, 1, 1])
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(logits, labels), batch_size=3)
    assert evaluate(Fixed(), loader, "cpu") == 0.75


# -------------------------------------------------------------------------------- pretrained files
def to_google_npz(model: nn.Module, path: Path) -> None:
    """Write a timm ViT in Google's ViT-B_16.npz key layout (the inverse of timm's _load_weights)."""
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    d = model.embed_dim
    h = model.blocks[0].attn.num_heads
    w = {
        "embedding/kernel": sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
        "embedding/bias": sd["patch_embed.proj.bias"],
        "cls": sd["cls_token"],
        "Transformer/posembed_input/pos_embedding": sd["pos_embed"],
        "Transformer/encoder_norm/scale": sd["norm.weight"],
        "Transformer/encoder_norm/bias": sd["norm.bias"],
        "head/kernel": sd["head.weight"].T,
        "head/bias": sd["head.bias"],
    }
    for i in range(len(model.blocks)):
        b, p = f"blocks.{i}.", f"Transformer/encoderblock_{i}/"
        mha = p + "MultiHeadDotProductAttention_1/"
        qkv_w, qkv_b = np.split(sd[b + "attn.qkv.weight"], 3), np.split(sd[b + "attn.qkv.bias"], 3)
        for n, wt, bs in zip(("query", "key", "value"), qkv_w, qkv_b):
            w[mha + n + "/kernel"] = wt.T.reshape(d, h, d // h)
            w[mha + n + "/bias"] = bs.reshape(h, d // h)
        w[mha + "out/kernel"] = sd[b + "attn.proj.weight"].reshape(d, h, d // h).transpose(1, 2, 0)
        w[mha + "out/bias"] = sd[b + "attn.proj.bias"]
        for j, norm in ((0, "norm1"), (2, "norm2")):
            w[p + f"LayerNorm_{j}/scale"] = sd[b + norm + ".weight"]
            w[p + f"LayerNorm_{j}/bias"] = sd[b + norm + ".bias"]
        for r in range(2):
            w[p + f"MlpBlock_3/Dense_{r}/kernel"] = sd[b + f"mlp.fc{r + 1}.weight"].T
            w[p + f"MlpBlock_3/Dense_{r}/bias"] = sd[b + f"mlp.fc{r + 1}.bias"]
    np.savez(path, **w)


def test_build_backbone_loads_local_files(tmp_path):
    torch.manual_seed(0)
    source = timm.create_model("vit_tiny_patch16_224", num_classes=NUM_CLASSES, **TINY_KW)
    ref = source.state_dict()
    save_file({k: v.contiguous() for k, v in ref.items()}, str(tmp_path / "w.safetensors"))
    torch.save(ref, tmp_path / "w.pth")
    torch.save({"state_dict": ref}, tmp_path / "w_wrapped.bin")
    to_google_npz(source, tmp_path / "ViT-tiny.npz")
    for name in ("w.safetensors", "w.pth", "w_wrapped.bin", "ViT-tiny.npz"):
        torch.manual_seed(123)  # a different random init: every tensor must come from the file
        model = build_backbone("vit_tiny_patch16_224", NUM_CLASSES, tmp_path / name, model_kwargs=TINY_KW)
        got = model.state_dict()
        for k, v in ref.items():  # the head is new for a new task (timm drops it, except from .npz)
            assert k.startswith("head.") or torch.allclose(got[k], v, atol=1e-6), (name, k)
        # another class count: the head is not loaded (new task), the backbone is
        model = build_backbone(
            "vit_tiny_patch16_224", 7, tmp_path / name, model_kwargs=TINY_KW, drop_path_rate=0.1
        )
        assert model.head.weight.shape == (7, 48)
        assert torch.allclose(model.blocks[1].mlp.fc2.weight, ref["blocks.1.mlp.fc2.weight"], atol=1e-6)
        assert isinstance(model.blocks[0].drop_path1, nn.Identity)  # timm's linear rule: block 0 gets 0
        assert model.blocks[1].drop_path1.drop_prob == pytest.approx(0.1)
    default_head = build_backbone("vit_tiny_patch16_224", None, pretrained=False, model_kwargs=TINY_KW)
    assert default_head.head.out_features == timm.create_model("vit_tiny_patch16_224", **TINY_KW).num_classes
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        build_backbone("vit_tiny_patch16_224", 3, tmp_path / "missing.safetensors", model_kwargs=TINY_KW)
    deeper = dict(TINY_KW, depth=3)
    with pytest.raises(ValueError, match="not in the file.*blocks.2"):
        build_backbone("vit_tiny_patch16_224", 3, tmp_path / "w.safetensors", model_kwargs=deeper)
    with pytest.raises(ValueError, match="cannot load pretrained file"):
        build_backbone("vit_tiny_patch16_224", 3, tmp_path / "ViT-tiny.npz", model_kwargs=deeper)


def test_no_reachable_weights_says_how_to_give_them(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(WeightsUnavailableError, match="--pretrained-file PATH.*--no-pretrained"):
        build_backbone("vit_tiny_patch16_224", 3, model_kwargs=TINY_KW)


def test_train_from_a_pretrained_file(data_root, tmp_path, capsys):
    torch.manual_seed(0)
    source = timm.create_model("vit_tiny_patch16_224", num_classes=10, **TINY_KW)
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    args = base_args(
        data_root, tmp_path / "pre", "--epochs", "1", "--pretrained-file", str(path), method="linear"
    )
    args.remove("--no-pretrained")
    assert main(args) == 0
    config = read(tmp_path / "pre", "config.json")
    assert config["pretrained_file"] == str(path.absolute()) and config["pretrained"] is True
    assert read(tmp_path / "pre", "result.json")["trainable_params"]["method"] == 0
    rc, _, line = _eval_acc(capsys, ["--adapter", str(tmp_path / "pre"), "--no-progress", "--check"])
    assert rc == 0 and "matches" in line


def test_output_folder_rules(tmp_path):
    from petl_zoo.train import UserError
    from petl_zoo.train.checkpoint import prepare_out_dir

    out = tmp_path / "run"
    assert prepare_out_dir(out, resume=False, overwrite=False, is_main=True) is False  # new folder
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="already holds a run; pass --resume"):
        prepare_out_dir(out, resume=False, overwrite=False, is_main=True)
    with pytest.raises(UserError, match="contradict"):
        prepare_out_dir(out, resume=True, overwrite=True, is_main=True)
    # killed before its first checkpoint: --resume starts again
    assert prepare_out_dir(out, resume=True, overwrite=False, is_main=True) is False
    assert not (out / "config.json").exists() and (out / "notes.txt").exists()
    (out / "last.pt").write_bytes(b"")
    assert prepare_out_dir(out, resume=True, overwrite=False, is_main=True) is True
    (out / "result.json").write_text("{}")
    with pytest.raises(UserError, match="already finished"):
        prepare_out_dir(out, resume=True, overwrite=False, is_main=True)
    (out / ".last.pt.abc.tmp").write_bytes(b"")
    assert prepare_out_dir(out, resume=False, overwrite=True, is_main=True) is False
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]  # only run files are deleted


def test_train_help_shows_every_recipe_default():
    """``train --help`` says what each recipe flag defaults to (the recipe's values included)."""
    from petl_zoo.train.args import build_train_parser
    from petl_zoo.train.recipe import RECIPES

    text = " ".join(build_train_parser().format_help().split())
    for flag, key in (
        ("--epochs", "epochs"),
        ("--lr", "lr"),
        ("--weight-decay", "weight_decay"),
        ("--seed", "seed"),
    ):
        assert f"{flag} {key.upper()} default: the recipe's {RECIPES['vtab'][key]}" in text
    assert (
        "--select-on {test,val} test: train on train800val200" in text
        and "default: the recipe's test" in text
    )
