"""``pvit verify DIR``: check every shard against the manifest.

Checks per shard: the file exists, its sha256 and sample count match the manifest,
every sample decodes, shapes match the spec (frames, resolution), and labels are in
range (finite positive depth or +inf sky, ids known, classes in the list, unit
normals, a proper camera). Returns the problems found, one line each.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from generation.manifest import read_manifest, sha256_file
from generation.shard_format import FormatError, read_shard


def check_clip(clip: dict, spec: dict, classes: list[str]) -> list[str]:
    """Range and shape problems of one decoded clip (empty when it is fine)."""
    problems = []
    t, h, w, _ = clip["rgb"].shape
    if (t, h, w) != (spec["frames"], spec["resolution"], spec["resolution"]):
        problems.append(f"{clip['key']}: frames/size {(t, h, w)} do not match the spec")
    depth = clip["depth"]
    if np.isnan(depth).any() or (depth <= 0).any():
        problems.append(f"{clip['key']}: depth has NaN or non-positive values")
    ids = clip["instances"]["id"]
    unknown = set(np.unique(clip["instance_seg"]).tolist()) - {0} - set(ids.tolist())
    if unknown:
        problems.append(f"{clip['key']}: instance_seg has ids {sorted(unknown)} with no instance")
    if clip["semantic_seg"].max() >= len(classes) or clip["instances"]["category"].max() >= len(classes):
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
    return problems


def verify_dataset(directory: Path) -> dict[str, list[str]]:
    """Problems per shard name (``"manifest"`` for dataset-level ones); empty when valid."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    if manifest is None:
        return {"manifest": [f"no readable manifest.json in {directory}"]}
    problems: dict[str, list[str]] = {}
    spec, classes = manifest["spec"], manifest["classes"]
    listed = {s["name"] for s in manifest["shards"]}
    for extra in sorted(p.name for p in directory.glob("shard-*.tar") if p.name not in listed):
        problems.setdefault(extra, []).append("shard file is not listed in the manifest")
    if not manifest["shards"]:
        problems.setdefault("manifest", []).append("manifest lists no shards")
    for record in manifest["shards"]:
        name, path = record["name"], directory / record["name"]
        found = problems.setdefault(name, [])
        if not path.is_file():
            found.append("missing")
            continue
        if sha256_file(path) != record["sha256"]:
            found.append("sha256 does not match the manifest")
        keys = []
        try:
            for clip in read_shard(path):
                keys.append(clip["key"])
                found.extend(check_clip(clip, spec, classes))
        except (FormatError, OSError, ValueError) as exc:
            found.append(f"does not decode: {exc}")
        if len(keys) != record["samples"] or keys != record.get("keys", keys):
            found.append(f"{len(keys)} samples decoded, manifest says {record['samples']}")
    return {name: p for name, p in problems.items() if p}
