"""The dataset manifest as training's contract: ``open_dataset(location)``.

Training reads exactly what ``manifest.json`` lists, nothing else: the shard URLs, how
many clips each holds, the class list (which sizes the segmentation head) and the
fields the clips carry. Checked when it opens (one listing of the location, no shard
byte read):

- no ``manifest.json`` (or not one with a list of shards and ``classes``): refused;
- a listed shard that is missing, or whose size differs from its record: refused,
  naming it (``pvit verify`` tells what else is wrong with it);
- a ``*.tar`` that the manifest does not list (a copy named ``other.tar``, a stray
  shard): ignored, with a warning naming it;
- an unfinished generation run (the manifest's ``dataset`` plans more shards than are
  committed: killed, or still rendering): refused, naming how many are missing. Only
  committed records count (``manifest.json`` plus the journal a killed run left,
  folded by ``read_manifest``); a half-rendered dataset is never trained on, because
  the stage key of a training run names the dataset it saw.

``DatasetError`` is one line, starting ``synthetic: `` (the training config field).
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from generation.dataset.manifest import MANIFEST_NAME, name_problem, read_manifest, write_manifest
from generation.dataset.shard_format import iter_raw_samples
from generation.dataset.storage import Location, LocationError, shard_url

log = logging.getLogger(__name__)

# What every clip holds (generation/dataset/shard_format.py, docs/dataset-format.md), and the
# optional fields a spec switch adds.
BASE_FIELDS = ("rgb", "depth", "instance_seg", "semantic_seg", "normal", "K",
               "world_to_camera", "instances", "meta")
OPTIONAL_FIELDS = {"flow": ("forward_flow", "backward_flow"),
                   "object_coordinates": ("object_coordinates",),
                   "tracks": ("tracks_query", "tracks_2d", "tracks_occluded",
                              "tracks_instance")}


class DatasetError(ValueError):
    """A dataset training must not read; ``str()`` is one line naming the problem."""


@dataclass(frozen=True)
class Shard:
    name: str
    url: str          # file: URL of a local shard, or an object URL (s3://bucket/ds/shard-000000.tar)
    clips: int
    bytes: int


@dataclass(frozen=True)
class DatasetIndex:
    location: str
    shards: tuple[Shard, ...]
    classes: tuple[str, ...]
    fields: tuple[str, ...]
    spec_hash: str | None

    @property
    def urls(self) -> list[str]:
        """Shard URLs in name order (the order node and worker splitting rely on)."""
        return [s.url for s in self.shards]

    @property
    def clips(self) -> int:
        return sum(s.clips for s in self.shards)

    @property
    def clips_per_shard(self) -> dict[str, int]:
        return {s.url: s.clips for s in self.shards}


def open_dataset(location, *, warn: Callable[[str], None] | None = None) -> DatasetIndex:
    """The shards, clip counts, classes and fields of the dataset at ``location`` (a
    path, ``file:``, ``s3://`` or ``gs://`` URL); raises ``DatasetError`` (see the
    module docstring)."""
    warn = warn or log.warning
    try:
        where = Location(location)
    except LocationError as exc:
        raise DatasetError(f"synthetic: {exc}") from None
    if where.local is not None and not where.local.is_dir():
        raise DatasetError(f"synthetic: no such shard directory {where}")
    try:
        files = where.listing()
    except LocationError as exc:   # no fsspec implementation for it (gcsfs missing)
        raise DatasetError(f"synthetic: {exc}") from None
    except OSError as exc:
        raise DatasetError(f"synthetic: cannot list {where}: {exc}") from None
    if MANIFEST_NAME not in files:
        raise DatasetError(f"synthetic: {where} has no {MANIFEST_NAME}: not a dataset written "
                           "by `pvit generate` (training reads only what a manifest lists)")
    manifest = read_manifest(where)
    if manifest is None or not isinstance(manifest.get("shards"), list):
        raise DatasetError(f"synthetic: {where.join(MANIFEST_NAME)} is not a readable "
                           "manifest (JSON with a list of shards)")
    classes = manifest.get("classes")
    if not (isinstance(classes, list) and classes and all(isinstance(c, str) for c in classes)):
        raise DatasetError(f"synthetic: {where.join(MANIFEST_NAME)} has no `classes` list")
    shards = []
    for index, record in enumerate(manifest["shards"]):
        name = record.get("name") if isinstance(record, dict) else None
        samples = record.get("samples") if isinstance(record, dict) else None
        if not isinstance(name, str) or not isinstance(samples, int):
            raise DatasetError(f"synthetic: {where.join(MANIFEST_NAME)}: shard record {index} "
                               "has no name or sample count")
        if problem := name_problem(name):
            raise DatasetError(f"synthetic: {where.join(MANIFEST_NAME)}: shard record {index} "
                               f"{problem}")
        meta = files.get(name)
        if meta is None:
            raise DatasetError(f"synthetic: {where.join(name)} is listed in the manifest but "
                               "missing")
        size = record.get("bytes")
        if isinstance(size, int) and meta.size != size:
            raise DatasetError(f"synthetic: {where.join(name)} has {meta.size} bytes, its "
                               f"manifest record says {size}: run `pvit verify {where}`")
        # local shards as absolute file: URLs (percent-encoded): whatever a name holds
        # ("pipe:", "#"), the reader opens that file
        url = shard_url(where.local / name) if where.local is not None else where.join(name)
        shards.append(Shard(name=name, url=url, clips=samples, bytes=meta.size))
    if not shards:
        raise DatasetError(f"synthetic: {where.join(MANIFEST_NAME)} lists no shards")
    _check_finished(where, manifest.get("dataset"), len(shards))
    listed = {s.name for s in shards}
    unlisted = sorted(n for n in files if n.endswith(".tar") and n not in listed)
    if unlisted:
        shown = ", ".join(unlisted[:5]) + (f" and {len(unlisted) - 5} more"
                                          if len(unlisted) > 5 else "")
        warn(f"synthetic: {where}: ignoring {len(unlisted)} shard file(s) the manifest does "
             f"not list ({shown})")
    spec = manifest.get("spec") if isinstance(manifest.get("spec"), dict) else {}
    fields = manifest.get("fields")
    if not (isinstance(fields, list) and all(isinstance(f, str) for f in fields)):
        fields = [*BASE_FIELDS, *(f for flag, extra in OPTIONAL_FIELDS.items()
                                  if spec.get(flag) for f in extra)]
    return DatasetIndex(location=where.url, shards=tuple(sorted(shards, key=lambda s: s.name)),
                        classes=tuple(classes), fields=tuple(fields),
                        spec_hash=manifest.get("spec_hash"))


def _check_finished(where: Location, dataset, committed: int) -> None:
    try:
        planned = -(-int(dataset["scenes"]) // int(dataset["scenes_per_shard"]))
    except (TypeError, KeyError, ValueError, ZeroDivisionError, OverflowError):
        return                      # no plan recorded (a hand-made manifest): as listed
    if committed < planned:
        raise DatasetError(f"synthetic: {where}: its generation run is unfinished ({committed} "
                           f"of {planned} planned shards committed); rerun `pvit generate` to "
                           "finish it")


def write_index(directory: Path, names: Iterable[str], classes: Iterable[str],
                spec: dict | None = None) -> dict:
    """A minimal ``manifest.json`` for shards written by other means than ``pvit
    generate`` (drawn test clips, converted data): name, sha256, sample count, keys and
    bytes of each listed shard, and the class list. Returns the manifest."""
    directory = Path(directory)
    shards = []
    for name in sorted(names):
        path = directory / name
        keys = [sample["__key__"] for sample in iter_raw_samples(path)]
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        shards.append({"name": name, "sha256": digest, "samples": len(keys), "keys": keys,
                       "seeds": [], "bytes": os.path.getsize(path)})
    manifest = {"format_version": 1, "spec": spec or {}, "spec_hash": None,
                "classes": list(classes), "shards": shards}
    write_manifest(directory, manifest)
    return manifest
