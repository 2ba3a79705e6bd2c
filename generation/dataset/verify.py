"""``pvit verify DIR``: check every shard against the manifest.

Checks per shard: the file exists, its sha256 and sample count match the manifest,
every sample decodes, shapes match the spec (frames, resolution), and labels are in
range (finite positive depth or +inf sky, ids known, classes in the list, unit
normals, a proper camera). The shard is held to docs/dataset-format.md too
(``ReadRules.for_manifest``): every member a regular file whose name is neither absolute
nor holds ``..`` (``tarfile.extractall`` would write it outside its target), every zstd
frame with its checksum, no plain ``.npy`` in a format 2 dataset, and no clip larger than
the manifest's spec renders, checked before anything is decompressed. Per dataset:
every planned shard (``dataset`` in the manifest) is there, and no ``*.tar`` is
unlisted. With ``labels`` (``pvit verify --labels``), each clip's labels are also
checked against each other (``label_checks``: floor plane, normals, masks and boxes,
classes, visibility, flow, tracks). Returns the problems found, one line each; a
damaged shard never stops the others from being checked. The dataset may be a local
directory or an object-store prefix (``s3://bucket/ds``): objects are streamed, never
downloaded whole.
"""

from __future__ import annotations

import tarfile
from collections import defaultdict

import numpy as np

from generation.dataset.label_checks import check_labels
from generation.dataset.manifest import (
    MANIFEST_NAME,
    MAX_SCENES,
    SHARD_PATTERN,
    SHARD_RE,
    name_problem,
    read_manifest,
    sha256_object,
)
from generation.dataset.shard_format import FormatError, ReadRules, read_shard
from generation.dataset.storage import Location, LocationError
from generation.dataset.track_format import track_ranges

# Missing planned shards named one by one; beyond these, one line counts the rest.
MISSING_SHOWN = 10


def check_clip(clip: dict, spec: dict, classes: list[str]) -> list[str]:
    """Range and shape problems of one decoded clip (empty when it is fine)."""
    problems = []
    t, h, w, _ = clip["rgb"].shape
    if (t, h, w) != (spec.get("frames"), spec.get("resolution"), spec.get("resolution")):
        problems.append(f"{clip['key']}: frames/size {(t, h, w)} do not match the spec")
    depth = clip["depth"]
    if np.isnan(depth).any() or (depth <= 0).any():
        problems.append(f"{clip['key']}: depth has NaN or non-positive values")
    ids = clip["instances"]["id"]
    unknown = set(np.unique(clip["instance_seg"]).tolist()) - {0} - set(ids.tolist())
    if unknown:
        problems.append(f"{clip['key']}: instance_seg has ids {sorted(unknown)} with no instance")
    # initial=0: a clip without instances is a label problem, not a crash
    if (clip["semantic_seg"].max(initial=0) >= len(classes)
            or clip["instances"]["category"].max(initial=0) >= len(classes)):
        problems.append(f"{clip['key']}: semantic class out of range (have {len(classes)})")
    norm = np.linalg.norm(clip["normal"], axis=-1)
    fg = clip["instance_seg"] > 0
    if fg.any() and np.abs(norm[fg] - 1).max() > 1e-3:
        problems.append(f"{clip['key']}: normals are not unit length on objects")
    if np.abs(norm[~fg]).max(initial=0) > 0:
        problems.append(f"{clip['key']}: normals are not zero on background")
    K = clip["K"]
    if not (K[0, 0] > 0 and K[1, 1] > 0 and K[2, 2] == 1):
        problems.append(f"{clip['key']}: K is not a pinhole matrix in pixels")
    rot = clip["world_to_camera"][:, :3, :3].astype(np.float64)
    if np.abs(rot @ rot.transpose(0, 2, 1) - np.eye(3)).max() > 1e-4:
        problems.append(f"{clip['key']}: world_to_camera rotation is not orthonormal")
    q = clip["instances"]["quaternion"]
    if np.abs(np.linalg.norm(q, axis=-1) - 1).max() > 1e-3:
        problems.append(f"{clip['key']}: instance quaternions are not unit")
    problems += [f"{clip['key']}: {p}" for p in track_ranges(clip)]
    return problems


class NotADataset(ValueError):
    """The path is not a shard directory at all: bad input (exit 2), not bad data."""


def verify_dataset(directory, labels: bool = False) -> dict[str, list[str]]:
    """Problems per shard name (``"manifest"`` and ``"dataset"`` for dataset-level
    ones); empty when valid. Every shard is checked whatever the others hold; with
    ``labels``, each clip's labels against each other too (``label_checks``)."""
    where = Location(directory)
    if where.local is not None and not where.local.is_dir():
        raise NotADataset(f"{where}: " + ("not a directory" if where.local.exists()
                                          else "no such directory"))
    try:
        files = where.listing()
    except LocationError as exc:   # no fsspec implementation for it (gcsfs missing)
        raise NotADataset(str(exc)) from None
    except OSError as exc:   # an object store that does not answer, or refuses us
        raise NotADataset(f"{where}: cannot list it: {exc}") from None
    if MANIFEST_NAME not in files:
        raise NotADataset(f"{where}: no {MANIFEST_NAME}, so not a shard directory")
    problems: dict[str, list[str]] = defaultdict(list)
    manifest = read_manifest(where)
    if manifest is None or not isinstance(manifest["shards"], list):
        return {"manifest": [f"{MANIFEST_NAME} is not readable JSON with a list of shards"]}
    spec, classes = manifest.get("spec"), manifest.get("classes")
    if not isinstance(spec, dict) or not isinstance(classes, list):
        problems["manifest"].append("no `spec` or `classes`: clip labels not checked")
        spec = classes = None
    listed: dict[str, int] = {}   # shard name -> clips in it that passed every check
    rules = ReadRules.for_manifest(manifest)   # the format, and the spec's clip size
    for index, record in enumerate(manifest["shards"]):
        name = record.get("name") if isinstance(record, dict) else None
        if problem := name_problem(name):      # nothing outside the dataset is read
            problems["manifest"].append(f"shard record {index} {problem}")
            continue
        found, clips, wrong_labels = check_shard(where, name, record, spec, classes, rules,
                                                 labels)
        problems[name].extend(found + wrong_labels)
        # a clip whose labels disagree is there and reads: not missing from the plan
        listed[name] = 0 if found else clips
    if not listed:
        problems["manifest"].append("manifest lists no shards")
    check_planned(manifest.get("dataset"), listed, problems)
    # training reads every *.tar of the directory, so an unlisted one would be trained on
    for extra in sorted(n for n in files if n.endswith(".tar") and n not in listed):
        problems[extra].append("shard file is not listed in the manifest")
    return {name: p for name, p in problems.items() if p}


def check_shard(where: Location, name: str, record: dict, spec: dict | None,
                classes: list | None, rules: ReadRules | None = None,
                labels: bool = False) -> tuple[list[str], int, list[str]]:
    """(problems of shard ``name`` of ``where``, clips decoded, label problems). Never
    raises on bad data: a damaged shard is one more line, and the caller goes on with the
    next shard.
    ``rules``: what the shard is held to besides decoding (``ReadRules.for_manifest``);
    ``labels``: check each clip's labels against each other (``label_checks``) once its
    ranges are right."""
    found = [f"manifest record has no {field}" for field in ("sha256", "samples")
             if field not in record]
    if not where.is_file(name):
        return found + ["missing"], 0, []
    try:
        if "sha256" in record and sha256_object(where, name) != record["sha256"]:
            found.append("sha256 does not match the manifest")
    except OSError as exc:
        return found + [f"cannot be read: {exc}"], 0, []
    keys, wrong_labels = [], []
    try:
        for clip in read_shard(where.local / name if where.local else where.join(name), rules):
            keys.append(clip["key"])
            if spec is not None and classes is not None:
                ranges = check_clip(clip, spec, classes)
                found.extend(ranges)
                if labels and not ranges:
                    wrong_labels.extend(check_labels(clip, classes))
            del clip   # one clip in memory at a time, not this one and the next
    except (FormatError, OSError, ValueError, tarfile.TarError) as exc:
        # truncated, empty or with a broken tar header: tarfile.ReadError
        found.append(f"does not decode after {len(keys)} samples: {exc}")
    if "samples" in record and len(keys) != record["samples"]:
        found.append(f"{len(keys)} samples decoded, manifest says {record['samples']}")
    elif keys != record.get("keys", keys):
        found.append("sample keys differ from the manifest")
    return found, len(keys), wrong_labels


def check_planned(dataset, listed: dict[str, int], problems: dict[str, list[str]]) -> None:
    """Compare the shards present with what the run planned (``dataset.scenes`` clips in
    shards of ``scenes_per_shard``), so a killed run or a full disk is not "ok". Works
    from the shards the manifest lists (O(listed)): the plan is never spelled out, so a
    manifest claiming a billion clips costs nothing."""
    try:
        scenes, per_shard = dataset["scenes"], dataset["scenes_per_shard"]
        if (not all(isinstance(v, int) and not isinstance(v, bool) for v in (scenes, per_shard))
                or scenes <= 0 or per_shard <= 0):
            raise ValueError
    except (TypeError, KeyError, ValueError):
        problems["manifest"].append("no valid `dataset` record (scenes, scenes_per_shard): "
                                    "completeness not checked")
        return
    if scenes > MAX_SCENES:
        problems["manifest"].append(f"the `dataset` record claims {scenes:,} clips, more than "
                                    f"a dataset may hold ({MAX_SCENES:,}): completeness not "
                                    "checked")
        return
    count = -(-scenes // per_shard)

    def clips_of(i: int) -> int:
        return min(per_shard, scenes - i * per_shard)

    planned = {}                         # the listed names that are planned -> their index
    for name in listed:
        index = int(name[6:12]) if SHARD_RE.fullmatch(name) else None
        if index is not None and index < count and SHARD_PATTERN.format(index) == name:
            planned[name] = index
        else:
            problems[name].append(f"not one of the {count} planned shards")
    missing = count - len(planned)
    if missing:
        shown, i = [], 0
        while len(shown) < MISSING_SHOWN and i < count:
            name = SHARD_PATTERN.format(i)
            if name not in planned:
                shown.append(name)
                clips = f"{clips_of(i)} clip" + ("s" if clips_of(i) != 1 else "")
                problems[name].append(f"planned ({clips}) but not in the manifest")
            i += 1
        if missing > len(shown):
            problems["dataset"].append(f"{missing - len(shown):,} more planned shards are not "
                                       "in the manifest")
    intact = sum(clips for name, clips in listed.items() if name in planned)
    if intact < scenes:
        problems["dataset"].append(f"{scenes - intact} of {scenes} planned clips are missing "
                                   "or in damaged shards")
