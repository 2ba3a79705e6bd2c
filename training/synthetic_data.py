"""Synthetic training clips: a webdataset pipeline over the shard directory.

Pipeline, per epoch pass (what flows between the stages):

    shard urls (from the manifest: generation.dataset.index.open_dataset)
    --split_by_node--> this rank's shards --split_by_worker--> this worker's
    shards --shardshuffle--> open, expand tar, group by key --> raw samples (bytes)
    --shuffle(buffer)--> decode_sample (generation.dataset.shard_format) --> clip dicts
    --SceneTransform--> tensors (video + scene targets)

This is the project's one webdataset pipeline (``synthetic_dataset``; with no transform
it ends at the clip dicts, which is how the shard format's tests read shards through
it). A shard is expanded and grouped by ``generation.dataset.shard_format`` (its own
bounded tar reader, webdataset's ``group_by_keys``), the same code as ``read_shard``,
``pvit verify`` and ``pvit show``.

``EndlessPasses`` repeats this pass after pass (reshuffled each time) inside each
DataLoader worker; ``synthetic_batches`` batches it for one epoch.

``SceneTransform`` picks ``num_frames`` consecutive frames, crops one random box and
flips (one ``ClipView``), and each task (``training.tasks``) computes its targets
through that same view: one geometry for RGB and every label (a flip also negates the
normals' x, mirrors object poses and boxes). Its randomness is a pure function of
(seed, epoch, pass, clip key), so a resumed run sees the very same clips.

Shards are local paths or object URLs (``s3://bucket/ds/shard-000000.tar``), opened by
``shard_format.iter_members`` through ``generation.dataset.storage.open_file`` (fsspec for
object stores, streamed), never through webdataset's ``gopen``, which runs a ``pipe:`` URL
as a shell command.

A shard that does not decode (``bad_shards``):
- ``stop`` (default): the run stops with ``ShardDecodeError``, one line naming the shard
  and the member (or the sample) that failed;
- ``skip``: the rest of that shard is dropped for the epoch (clips of it already read
  stay read) and a marker takes the failing sample's place in the stream. Markers are
  filtered out before batching, inside the loader worker, and travel to the training
  process as their own items, which ``synthetic_batches`` folds into the next batch's
  ``SKIPPED_SHARDS``: so every worker's skips reach the run. The same shard fails at the
  same point in every replay of the epoch, so a resumed run sees the same batches. A
  stream with no decodable shard left ends with ``ShardDecodeError`` all the same.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader

from generation.dataset.index import DatasetIndex, open_dataset
from generation.dataset.shard_format import FormatError, decode_sample, group_samples, iter_members
from training.loader_workers import loader_worker_kwargs
from training.tasks import ClipView, default_tasks, get_task
from training.tasks.base import resize

# timm ViT (ImageNet) normalisation, so image-pretrained weights see familiar inputs
RGB_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1, 1)
RGB_STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1, 1)

# key of the marker a skipped shard leaves in the sample stream: {BAD_SHARD: url, REASON}
BAD_SHARD = "__bad_shard__"
REASON = "__reason__"
# key of every synthetic batch: {shard url: one-line reason} skipped since the last batch
SKIPPED_SHARDS = "__skipped_shards__"


class ShardDecodeError(RuntimeError):
    """A shard failed to decode during training; ``str()`` is one line naming the shard
    and the member. Raised in a DataLoader worker, it reaches the main process wrapped
    in torch's traceback text: ``str()`` finds the line again."""

    def __str__(self) -> str:
        text = super().__str__()
        marker = f"{type(self).__name__}: "
        lines = [line.split(marker, 1)[1] for line in text.splitlines() if marker in line]
        return lines[-1] if lines else text.splitlines()[0] if text else ""


def synthetic_index(location: str | Path) -> DatasetIndex:
    """The dataset training reads: what its manifest lists (see ``open_dataset``)."""
    return open_dataset(location)


def shard_urls(location: str | Path) -> list[str]:
    """The shards the manifest of ``location`` lists, in name order (order matters for
    node splitting); unlisted ``*.tar`` files are ignored with a warning."""
    return open_dataset(location).urls


def normalize_rgb(frames: torch.Tensor) -> torch.Tensor:
    """uint8 ``[T, H, W, 3]`` -> normalised float ``[3, T, H, W]``."""
    x = frames.permute(3, 0, 1, 2).float().div_(255.0)
    return (x - RGB_MEAN) / RGB_STD


@dataclass
class SceneTransform:
    """Clip dict -> training sample. Picklable, so it runs in DataLoader workers."""

    num_frames: int
    img_size: int
    label_size: int
    depth_max_m: float
    pose_slots: int
    crop_scale: tuple[float, float] = (0.6, 1.0)
    flip: bool = True
    train: bool = True
    seed: int = 0
    # the tasks whose targets each sample carries (training/tasks/); None: the defaults
    tasks: Optional[tuple[str, ...]] = None

    def __call__(self, clip: dict) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, zlib.crc32(clip["key"].encode())])
        total, height, width = clip["rgb"].shape[:3]
        if total >= self.num_frames:
            start = int(rng.integers(0, total - self.num_frames + 1)) if self.train else \
                (total - self.num_frames) // 2
            frames = np.arange(start, start + self.num_frames)
        else:  # short clip: repeat frames evenly
            frames = np.linspace(0, total - 1, self.num_frames).round().astype(int)

        # one square crop box for RGB and every label map
        side_max = min(height, width)
        if self.train:
            area = rng.uniform(*self.crop_scale) * side_max * side_max
            side = int(np.clip(round(np.sqrt(area)), 1, side_max))
            top = int(rng.integers(0, height - side + 1))
            left = int(rng.integers(0, width - side + 1))
            flip = self.flip and bool(rng.integers(0, 2))
        else:
            side, flip = side_max, False
            top, left = (height - side_max) // 2, (width - side_max) // 2
        view = ClipView(clip=clip, frames=frames, top=top, left=left, side=side, flip=flip,
                        label_size=self.label_size, depth_max_m=self.depth_max_m,
                        pose_slots=self.pose_slots)
        rgb = view.crop("rgb").permute(0, 3, 1, 2).float()  # [T, 3, h, w]
        rgb = resize(rgb, self.img_size, "bilinear").clamp_(0, 255)
        sample = {"video": normalize_rgb(rgb.permute(0, 2, 3, 1))}
        # the same view (frames, box, flip) for every task's targets
        for name in self.tasks if self.tasks is not None else default_tasks():
            sample.update(get_task(name).targets(view))
        return sample


def _shard_samples(url: str) -> Iterator[dict]:
    """The raw samples of one shard (``shard_format.iter_members`` grouped by
    ``group_samples``, as ``read_shard`` reads it), streamed; a shard that cannot be
    opened, read or grouped (truncated, not a plain tar, a member twice) is a
    ``ShardDecodeError`` naming it and the last member read."""
    last = None

    def named(members: Iterator[dict]) -> Iterator[dict]:
        nonlocal last
        for member in members:
            last = member["fname"]
            yield member
    try:
        yield from group_samples(named(iter_members(url)))
    except Exception as exc:  # noqa: BLE001 - any reader error: one line naming the shard
        where = f"after member {last}" if last else "at its first member"
        raise ShardDecodeError(f"synthetic: shard {url} does not decode {where}: "
                               f"{_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _open_tar_samples(urls: Iterable[dict], bad: Optional[dict[str, str]] = None
                      ) -> Iterator[dict]:
    """``{"url"}`` dicts -> raw samples (``_shard_samples``). ``bad`` (skip mode): the
    shards found bad so far; a shard in it is not read (further)."""
    for entry in urls:
        url = entry["url"]
        if bad is None:
            yield from _shard_samples(url)
            continue
        if url in bad:
            continue
        try:
            for sample in _shard_samples(url):
                if url in bad:  # one of its samples failed to decode meanwhile
                    break
                yield sample
        except ShardDecodeError as exc:
            bad[url] = str(exc)
            yield {BAD_SHARD: url, REASON: str(exc)}


def decode_or_name(sample: dict) -> dict:
    """``decode_sample``, with a failure turned into one line naming the shard and the
    sample (the decoder's message names the member)."""
    try:
        return decode_sample(sample)
    except Exception as exc:  # noqa: BLE001 - any decoder error: one line naming the shard
        what = _first_line(exc)
        if not isinstance(exc, FormatError):   # FormatError's message names the member
            what = f"sample {sample.get('__key__')!r}: {what}"
        raise ShardDecodeError(f"synthetic: shard {sample.get('__url__')}: {what}") from None


def _decode_samples(bad: Optional[dict[str, str]]):
    """The decode stage: raw samples -> clip dicts; markers pass. In skip mode a sample
    that fails becomes its shard's marker and the shard's later samples are dropped."""
    def stage(samples: Iterable[dict]) -> Iterator[dict]:
        for sample in samples:
            if BAD_SHARD in sample:
                yield sample
                continue
            url = sample.get("__url__")
            if bad is not None and url in bad:
                continue
            try:
                clip = decode_or_name(sample)
            except ShardDecodeError as exc:
                if bad is None:
                    raise
                bad[url] = str(exc)
                yield {BAD_SHARD: url, REASON: str(exc)}
                continue
            clip["__key__"] = sample.get("__key__")  # as wds.map does
            yield clip
    return stage


def _transform_clips(transform: SceneTransform):
    """The transform stage: clip dicts -> model-ready tensors; markers pass."""
    def stage(clips: Iterable[dict]) -> Iterator[dict]:
        for clip in clips:
            if BAD_SHARD in clip:
                yield clip
                continue
            sample = transform(clip)
            sample["__key__"] = clip.get("__key__")
            yield sample
    return stage


def synthetic_dataset(urls: list[str], transform: Optional[SceneTransform], seed: int,
                      shuffle_buffer: int, split_by_node: bool = True,
                      bad: Optional[dict[str, str]] = None) -> wds.DataPipeline:
    """One pass over the shards, shuffled by ``seed`` (see the module docstring).
    ``transform`` None: the pass yields the decoded clip dicts (``decode_sample``'s,
    plus ``__key__``) instead of tensors. ``bad``: None stops on a shard that does not
    decode; a dict (skip mode) collects the bad shards' reasons, and the stream carries
    a marker for each."""
    return wds.DataPipeline(
        # {"url": path or object URL} per shard, in sorted order, opened by
        # _open_tar_samples through storage.open_file (never by webdataset's gopen,
        # which runs "pipe:..." as a shell command)
        wds.SimpleShardList(list(urls)),
        *([wds.split_by_node] if split_by_node else []),  # this rank's shards
        wds.split_by_worker,  # this DataLoader worker's shards
        wds.shuffle(len(urls), initial=len(urls), seed=seed),  # shardshuffle: all shards
        # raw samples: {"__key__", "rgb.npy": bytes, ...}
        lambda entries: _open_tar_samples(entries, bad),
        wds.shuffle(shuffle_buffer, initial=shuffle_buffer, seed=seed),  # bytes: cheap to hold
        _decode_samples(bad),  # clip dicts (generation.dataset.shard_format)
        *([_transform_clips(transform)] if transform is not None else []),  # tensors
    )


def collate_synthetic(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    # wds.map re-attaches "__key__" to dict results; only tensors are batched
    return {k: torch.stack([s[k] for s in samples]) for k in samples[0] if not k.startswith("__")}


class EndlessPasses(torch.utils.data.IterableDataset):
    """Batches of pass after pass over the shards, each pass reshuffled by (seed, epoch,
    pass). Picklable; each DataLoader worker runs its own passes over its own shards, so
    workers start once per epoch, not once per pass. Batching happens here, so that skip
    markers (``bad_shards: skip``) never land in a batch: each is yielded as an item of
    its own, ``{SKIPPED_SHARDS: {url: reason}}``."""

    def __init__(self, urls: list[str], transform: SceneTransform, *, seed: int, epoch: int,
                 shuffle_buffer: int, split_by_node: bool, batch_size: int,
                 bad_shards: str = "stop"):
        self.urls, self.transform, self.seed, self.epoch = urls, transform, seed, epoch
        self.shuffle_buffer, self.split_by_node = shuffle_buffer, split_by_node
        self.batch_size, self.bad_shards = batch_size, bad_shards

    def __iter__(self) -> Iterator[dict]:
        # skip mode: the shards this worker found bad, for the rest of the epoch
        bad: Optional[dict[str, str]] = {} if self.bad_shards == "skip" else None
        batch: list[dict] = []
        for pass_index in range(1 << 30):
            rng = np.random.default_rng([self.seed, self.epoch, pass_index])
            pass_seed = int(rng.integers(1 << 31))
            transform = SceneTransform(**{**self.transform.__dict__, "seed": pass_seed})
            empty = True
            for sample in synthetic_dataset(self.urls, transform, pass_seed, self.shuffle_buffer,
                                            self.split_by_node, bad):
                if BAD_SHARD in sample:
                    yield {SKIPPED_SHARDS: {sample[BAD_SHARD]: sample[REASON]}}
                    continue
                empty = False
                batch.append(sample)
                if len(batch) == self.batch_size:
                    yield collate_synthetic(batch)
                    batch = []
            if empty and bad is not None:  # every shard of this worker is bad: it is done
                return
            if empty:  # this worker owns no clip: stop rather than spin forever
                raise ValueError("synthetic: a loader worker got no clips from its shards")


def _fold_skip_reports(items: Iterator[dict]) -> Iterator[dict[str, Any]]:
    """The loader's items -> batches, each carrying ``SKIPPED_SHARDS``: the shards
    reported skipped since the previous batch. The stream ends only when no worker has
    a decodable shard left: that is an error, as in stop mode."""
    reported: dict[str, str] = {}
    seen: dict[str, str] = {}
    for item in items:
        if "video" not in item:
            reported.update(item[SKIPPED_SHARDS])
            seen.update(item[SKIPPED_SHARDS])
            continue
        item[SKIPPED_SHARDS] = reported
        reported = {}
        yield item
    first = next(iter(seen.values()), "no shard reported")
    raise ShardDecodeError(f"synthetic: no shard left that decodes ({len(seen)} skipped, "
                           f"bad_shards: skip); the first: {first}")


def synthetic_batches(urls: list[str], transform: SceneTransform, *, batch_size: int,
                      seed: int, epoch: int, shuffle_buffer: int, num_workers: int,
                      world_size: int = 1, bad_shards: str = "stop"
                      ) -> Iterator[dict[str, Any]]:
    """Endless batches for one epoch. The caller takes as many as an epoch needs, so
    every rank runs the same number of steps whatever its shards hold. Each batch has
    tensors and ``SKIPPED_SHARDS`` (``{url: reason}``, empty unless ``bad_shards`` is
    ``skip`` and a shard was skipped since the previous batch)."""
    if len(urls) < world_size:
        raise ValueError(f"synthetic: {len(urls)} shards cannot feed {world_size} processes")
    # every worker must own at least one shard, or it would have nothing to yield
    workers = min(num_workers, len(urls) // world_size)
    dataset = EndlessPasses(urls, transform, seed=seed, epoch=epoch,
                            shuffle_buffer=shuffle_buffer, split_by_node=world_size > 1,
                            batch_size=batch_size, bad_shards=bad_shards)
    # batch_size=None: the dataset batches (see EndlessPasses), the loader only moves
    loader = DataLoader(dataset, batch_size=None, num_workers=workers,
                        **loader_worker_kwargs(workers),
                        # its own generator: starting a loader must not consume the
                        # global RNG, or a resumed run's dropout would drift
                        generator=torch.Generator().manual_seed(seed + epoch))
    return _fold_skip_reports(iter(loader))
