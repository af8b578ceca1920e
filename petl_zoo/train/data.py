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

    @property
    def steps_per_epoch(self) -> int:
        return len(self.loader)

    def loader_for(self, epoch: int) -> DataLoader:
        """The training loader of ``epoch``: one loader serves every epoch, its workers persistent; the
        sampler's ``set_epoch`` sets the order and, through ``vtab.make_loader``'s per-sample seeds, the
        augmentation, so an epoch's batches depend on the seed and the epoch only (any worker count, an
        exact --resume)."""
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
    loader = vtab.make_loader(
        train_set, per_rank, shuffle=False, sampler=sampler, workers=spec.workers, seed=seed
    )
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
    )
