"""The run's data: the VTAB-1K training split with its per-rank sampler, and the evaluation loaders."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from . import distributed as D
from .recipe import train_split
from .spec import RunSpec

__all__ = ["RunData", "build_data"]

_EPOCH_SEED_STRIDE = 1000003  # the training loader's seed for epoch e: seed + stride * e


@dataclass
class RunData:
    """The training set and loader (rank-sharded, ``per_rank_batch`` images a step) and the evaluation
    loaders by split name (``test``, and ``val`` when selecting on val)."""

    train_split: str
    train_set: Dataset
    sampler: DistributedSampler
    loader: DataLoader
    eval_loaders: dict[str, DataLoader]
    per_rank_batch: int
    workers: int
    seed: int
    rebuild_per_epoch: bool

    @property
    def steps_per_epoch(self) -> int:
        return len(self.loader)

    def loader_for(self, epoch: int) -> DataLoader:
        """The training loader of ``epoch``. With augmentation in worker processes the workers' RNGs
        must depend on the epoch only (for an exact --resume), so the loader is rebuilt per epoch;
        otherwise one loader serves every epoch (the sampler's ``set_epoch`` sets the order)."""
        if self.rebuild_per_epoch and epoch > 0:
            self.loader = _train_loader(
                self.train_set, self.sampler, self.per_rank_batch, self.workers, self.seed, epoch
            )
        return self.loader

    def start_loader(self, info: D.DistInfo, batch_size: int) -> DataLoader:
        """What ``on_train_start`` sees: under DDP every rank gets the whole training set in the
        single-process order (so every rank computes the same structure); else the training loader."""
        if not info.enabled:
            return self.loader
        import vtab

        whole = D.train_sampler(self.train_set, D.DistInfo(), self.seed)
        return vtab.make_loader(
            self.train_set, batch_size, shuffle=False, sampler=whole, workers=self.workers, seed=self.seed
        )


def _train_loader(
    dataset: Dataset, sampler: DistributedSampler, batch: int, workers: int, seed: int, epoch: int
) -> DataLoader:
    import vtab

    seed = seed + _EPOCH_SEED_STRIDE * epoch
    return vtab.make_loader(dataset, batch, shuffle=False, sampler=sampler, workers=workers, seed=seed)


def build_data(spec: RunSpec, info: D.DistInfo, model: nn.Module) -> RunData:
    """Datasets and loaders of ``spec`` (transforms from ``model``'s data config and the protocol)."""
    import vtab

    recipe, root, seed = spec.recipe, spec.data_root, spec.recipe["seed"]
    split = train_split(recipe)
    train_tf = vtab.build_transform(model, recipe["protocol"], augment=recipe["augment"], crop=recipe["crop"])
    eval_tf = vtab.build_transform(model, recipe["protocol"], crop=recipe["crop"])
    train_set = vtab.VtabDataset(spec.task, split, train_tf, root, spec.num_classes)
    eval_sets = {}
    if spec.test:  # --no-test (tuning grid points): the test split is never read
        eval_sets["test"] = vtab.VtabDataset(spec.task, "test", eval_tf, root, spec.num_classes)
    if recipe["select_on"] == "val":
        eval_sets["val"] = vtab.VtabDataset(spec.task, "val", eval_tf, root, spec.num_classes)
    sampler = D.train_sampler(train_set, info, seed)
    per_rank = recipe["batch_size"] // info.world_size
    loader = _train_loader(train_set, sampler, per_rank, spec.workers, seed, 0)
    eval_loaders = {
        name: vtab.make_loader(
            D.shard(ds, info), recipe["batch_size"], shuffle=False, workers=spec.workers, seed=seed
        )
        for name, ds in eval_sets.items()
    }
    return RunData(
        train_split=split,
        train_set=train_set,
        sampler=sampler,
        loader=loader,
        eval_loaders=eval_loaders,
        per_rank_batch=per_rank,
        workers=spec.workers,
        seed=seed,
        rebuild_per_epoch=recipe["augment"] and spec.workers > 0,
    )
