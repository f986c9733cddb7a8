"""Foreground oversampling for 2D training on sparse targets (MS lesions: ~1 % of the voxels).

nnU-Net (Isensee et al., Nature Methods 2021; ``oversample_foreground_percent = 0.33``) makes a
third of every batch contain foreground. :class:`ForegroundOversampler` does the same for slice
datasets: in every group of ``batch_size`` consecutive indices, the last
``max(1, round(fraction * batch_size))`` are drawn from the slices that contain foreground; the
others walk through a fresh random permutation of all slices, so an epoch still visits (almost)
every slice. With ``fraction = 0`` it is a plain shuffling sampler.

:func:`slices_with_foreground` tells, for a data list of slices (``image``, ``label``, ``slice``),
which slices have a non-zero label, reading each label volume once.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler

from ..guards import BadInputError

__all__ = ["ForegroundOversampler", "slices_with_foreground"]


def slices_with_foreground(datalist: Sequence[dict], label_key: str = "label") -> list[bool]:
    """``True`` for each slice entry whose label slice (axis -1 index ``slice``) has a non-zero voxel.

    Entries without ``slice`` are whole 2D labels. Each label file is read once (MONAI ``LoadImage``,
    so every format the loaders take); an unreadable file raises naming it.
    """
    from monai.transforms import LoadImage

    load = LoadImage(image_only=True)
    per_file: dict[str, np.ndarray] = {}
    out = []
    for item in datalist:
        path = item[label_key]
        if path not in per_file:
            try:
                lab = np.asarray(load(path))
            except Exception as err:
                raise BadInputError(path, f"cannot read the label to find foreground slices ({err})") from err
            # slices with foreground along the last axis (a 2D label: one entry)
            per_file[path] = (lab.reshape(-1, lab.shape[-1]) != 0).any(0) if lab.ndim >= 3 else \
                np.array([bool((lab != 0).any())])
        fg = per_file[path]
        out.append(bool(fg[item["slice"]]) if "slice" in item else bool(fg.any()))
    return out


class ForegroundOversampler(Sampler[int]):
    """Indices of a slice dataset in which every batch holds foreground slices (nnU-Net's oversampling).

    Args:
        foreground: per dataset item, whether it contains foreground (:func:`slices_with_foreground`).
        batch_size: the data loader's batch size (the groups the guarantee applies to).
        fraction: share of each batch drawn from foreground items (at least one when > 0).
        num_samples: indices per epoch (default: the dataset length, split over ``num_replicas``).
        seed: random seed; each replica ``rank`` draws its own stream.
        num_replicas, rank: for distributed training (one sampler per process, like
            ``DistributedSampler``); every replica yields ``num_samples`` indices.

    Like ``DistributedSampler``, :meth:`set_epoch` makes an epoch's indices a function of
    ``(seed, rank, epoch)`` alone (MONAI's workflows and :class:`common.handlers.EpochSeed` call
    it), so a training resumed at epoch ``e`` draws what the uninterrupted run drew; without it,
    one stream runs on across epochs.
    """

    def __init__(self, foreground: Sequence[bool], batch_size: int, fraction: float = 0.33,
                 num_samples: int | None = None, seed: int = 0, num_replicas: int = 1, rank: int = 0) -> None:
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"ForegroundOversampler: fraction must be in [0, 1], got {fraction}")
        if batch_size < 1:
            raise ValueError(f"ForegroundOversampler: batch_size must be >= 1, got {batch_size}")
        self.n = len(foreground)
        if self.n == 0:
            raise ValueError("ForegroundOversampler: the dataset is empty")
        self.fg_index = torch.as_tensor([i for i, f in enumerate(foreground) if f], dtype=torch.long)
        self.batch_size = int(batch_size)
        self.forced = 0 if fraction == 0 or len(self.fg_index) == 0 else max(1, round(fraction * batch_size))
        self.forced = min(self.forced, self.batch_size)
        self.num_samples = int(num_samples) if num_samples else math.ceil(self.n / num_replicas)
        self.seed, self.rank = int(seed), int(rank)
        self.generator = torch.Generator().manual_seed(self.seed * 1000003 + self.rank)

    def set_epoch(self, epoch: int) -> None:
        """Restart the random stream at a state that depends only on seed, rank and ``epoch``."""
        self.generator.manual_seed((self.seed * 1000003 + self.rank) * 1009 + int(epoch))

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        order = torch.randperm(self.n, generator=self.generator)
        take = 0
        for pos in range(self.num_samples):
            if pos % self.batch_size >= self.batch_size - self.forced:
                k = int(torch.randint(len(self.fg_index), (1,), generator=self.generator))
                yield int(self.fg_index[k])
            else:
                if take == self.n:
                    order, take = torch.randperm(self.n, generator=self.generator), 0
                yield int(order[take])
                take += 1
