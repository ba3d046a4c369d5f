"""torch ``Dataset`` views over one split, the epoch-seeded batch sampler, and the DataLoader factory.

Randomness is a pure function of (seed, epoch, image index), never of worker ids or of how many batches
came before: the shuffle of epoch e is ``randperm`` seeded from (seed, e), and each image's augmentation
is drawn under a generator seeded from (seed, e, index). So a run resumed at an epoch boundary sees
exactly the batches an uninterrupted run would have, with any number of workers.

A view returns whole batches (``__getitems__``): image files are decoded and resized one at a time as
uint8, stacked, and only then turned into float32 (so a batch, never the dataset, is ever in float);
in-memory arrays are preprocessed a batch at a time.
"""

from __future__ import annotations

import math
import random

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler
from torch.utils.data import Dataset as TorchDataset

from hwkd.data.augment import random_affine
from hwkd.data.preprocess import Preprocessing, vision

# RandomResizedCrop's area range: torchvision's default (0.08, 1) is tuned for 224 px ImageNet; at
# the 32 px of CIFAR-like data it destroys the object, and KD runs are short.
CROP_SCALE = (0.25, 1.0)


def mix_seed(seed: int, epoch: int, index: int) -> int:
    """A well-spread 63-bit seed from (seed, epoch, index) (splitmix64 finaliser)."""
    z = (int(seed) * 0x9E3779B97F4A7C15 + int(epoch) * 0xBF58476D1CE4E5B9 + int(index) * 0x94D049BB133111EB + 1) % 2**64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % 2**64
    return (z ^ (z >> 31)) % 2**63


class SplitView(TorchDataset):
    """One split of a source, indexed by (epoch, position) keys; ``augment`` None | affine | crop_flip |
    pad_crop_flip."""

    def __init__(self, source, indices: np.ndarray, prep: Preprocessing, augment: str | None, seed: int):
        self.source = source
        self.indices = np.asarray(indices, dtype=np.int64)
        self.prep = prep
        self.augment = augment
        self.seed = int(seed)
        self._crop_flip = None

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key):
        x, y = self.__getitems__([key])
        return x[0], y[0]

    def __getitems__(self, keys):
        keys = [k if isinstance(k, tuple) else (0, k) for k in keys]
        epoch = keys[0][0]
        idx = self.indices[np.fromiter((k[1] for k in keys), dtype=np.int64, count=len(keys))]
        y = torch.as_tensor(self.source.y[idx], dtype=torch.int64)
        crop_flip = self.augment in ("crop_flip", "pad_crop_flip")
        if self.source.kind == "files":
            items = []
            for i in idx:
                img = torch.from_numpy(self.source.read(int(i)))
                items.append(self._random_crop(img, epoch, int(i)) if crop_flip else self.prep.geometry(img))
            x = self.prep.normalize(torch.stack(items))
        else:
            x = self.prep.apply(self.source.images[idx])
            if crop_flip:
                x = torch.stack([self._random_crop(im, epoch, int(i)) for im, i in zip(x, idx, strict=True)])
        if self.augment == "affine":
            x = random_affine(x, torch.Generator().manual_seed(mix_seed(self.seed, epoch, int(idx[0]))))
        return x, y

    def _random_crop(self, img: torch.Tensor, epoch: int, index: int) -> torch.Tensor:
        """A random crop + horizontal flip, seeded by (seed, epoch, index): ``crop_flip`` takes a
        RandomResizedCrop to the output size; ``pad_crop_flip`` brings the image to the output size, pads it
        by an eighth of its side with zeros and takes a crop of the output size (the CIFAR recipe:
        32 px, padding 4)."""
        if self._crop_flip is None:
            mode, _ = vision()
            from torchvision.transforms import v2

            size = list(self.prep.output_size)
            if self.augment == "pad_crop_flip":
                crop = [v2.Lambda(self.prep.geometry), v2.RandomCrop(size, padding=max(1, min(size) // 8))]
            else:
                crop = [v2.RandomResizedCrop(size, scale=CROP_SCALE, interpolation=mode(self.prep.interpolation),
                                             antialias=True)]  # fmt: skip
            self._crop_flip = v2.Compose([*crop, v2.RandomHorizontalFlip()])
        # transforms.v2 draws from torch's global CPU generator: seed it for this image, then put the
        # caller's state back. Not torch.manual_seed: it also queues a CUDA seeding call (with a stack
        # trace) per image on hosts where CUDA is not initialised.
        state = torch.get_rng_state()
        try:
            torch.default_generator.manual_seed(mix_seed(self.seed, epoch, index))
            return self._crop_flip(img)
        finally:
            torch.set_rng_state(state)


class EpochBatchSampler(Sampler):
    """Batches of (epoch, position) keys; shuffled by a generator seeded from (seed, epoch).

    ``set_epoch(e)`` before iterating (hwkd.train.fit does); with ``drop_below`` a last batch smaller
    than that is dropped (BatchNorm cannot train on a batch of one).
    """

    def __init__(self, n: int, batch_size: int, shuffle: bool, seed: int = 0, epoch: int = 0, drop_below: int = 0):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.n, self.batch_size, self.shuffle = int(n), int(batch_size), bool(shuffle)
        self.seed, self.epoch, self.drop_below = int(seed), int(epoch), int(drop_below)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def order(self) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.n)
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(mix_seed(self.seed, self.epoch, -1)))

    def __iter__(self):
        from hwkd.distributed import shard, world_size

        order = self.order().tolist()
        ranks = world_size() if self.shuffle else 1  # evaluation: every rank sees the whole split
        for start in range(0, self.n, self.batch_size):
            chunk = order[start : start + self.batch_size]
            if len(chunk) < self.drop_below * ranks:  # under torchrun every rank needs drop_below
                continue
            # torchrun: each rank takes its share of the same global training batch (a DistributedSampler
            # over the (seed, epoch) shuffle), so N processes train on the batches one process would.
            yield [(self.epoch, p) for p in (shard(chunk) if ranks > 1 else chunk)]

    def __len__(self) -> int:
        from hwkd.distributed import world_size

        full, rest = divmod(self.n, self.batch_size)
        ranks = world_size() if self.shuffle else 1
        return full + (1 if rest and rest >= self.drop_below * ranks else 0)


def _as_is(batch):
    return batch  # the view already returns a collated (x, y) batch


def _seed_worker(worker_id: int) -> None:
    """Deterministic Python / NumPy RNGs in workers (torch's is seeded by the DataLoader's generator)."""
    s = torch.initial_seed() % 2**32
    random.seed(s)
    np.random.seed(s)


def make_loader(
    view: SplitView,
    sampler: EpochBatchSampler,
    *,
    workers: int,
    pin_memory: bool,
    persistent: bool,
    seed: int,
) -> DataLoader:
    kwargs = {}
    if workers > 0:
        kwargs = {"persistent_workers": persistent, "prefetch_factor": 4, "worker_init_fn": _seed_worker}
    return DataLoader(
        view,
        batch_sampler=sampler,
        collate_fn=_as_is,
        num_workers=workers,
        pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(int(seed)),
        **kwargs,
    )


def set_epoch(loader: DataLoader, epoch: int) -> None:
    """Make ``loader`` yield epoch ``epoch``'s shuffle and augmentations (persistent workers keep going)."""
    loader.batch_sampler.set_epoch(epoch)


def auto_workers(source_kind: str, n: int, batch_size: int, accelerator: bool = False) -> int:
    """0 for in-memory arrays (a batch is one indexing op) and for small folders (fork costs more than
    it saves); else decoding processes, one core left for the training process. Training on the CPU:
    up to 4, the other cores run the model. On a GPU the cores only decode: up to 8 (an H200 host's 16
    cores decoded CIFAR-10 JPEGs at 6.8k images/s with 4 workers, 14.1k with 8: a ceiling for any GPU step
    faster than 6.8k/s; hwkd's loop trained a 27k-parameter student at 2.7k/s either way, so it gained
    nothing: docs/decisions-issue14.md, stop 28). Under torchrun the host's cores are shared by its
    ranks (``LOCAL_WORLD_SIZE``)."""
    import os

    if source_kind != "files" or n < 8 * batch_size:
        return 0
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    try:
        ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        ranks = 1
    return max(1, min(8 if accelerator else 4, cores // ranks - 1))


def batches_for(n: int, batch_size: int) -> int:
    return max(1, math.ceil(n / batch_size))
