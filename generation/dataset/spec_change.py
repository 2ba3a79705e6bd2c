"""Has the spec of a dataset changed? Nothing is rendered over or removed without asking.

A dataset directory whose ``manifest.json`` was made with another spec than the
config's (any ``generation.scene`` field, the asset manifest's contents, the renderer:
``bpy``/``kubric`` versions or the code that makes clips, or the ``dataset`` section:
``seed``, ``scenes_per_shard``, fewer ``scenes``) would have its shards replaced or
removed. ``check`` refuses that, naming every changed field (old → new), unless the
config says ``overwrite``. More scenes is not a change: it only adds shards.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from generation.dataset.manifest import SHARD_RE, read_manifest, renderer_fingerprint
from generation.dataset.storage import Location, canonical

if TYPE_CHECKING:   # the stage's config; the store reads its fields and never imports it
    from generation.config import GenerationConfig

HINT = ("rerun with --overwrite (or set generation.overwrite: true) to replace them; each "
        "old shard stays until its replacement is rendered")


class SpecChanged(ValueError):
    """The config would replace a dataset made with another spec; ``str()`` is one line
    naming the changed fields."""

    def __init__(self, out: Path, changes: list[str], shards: int, hint: str = HINT):
        self.out, self.changes, self.shards = canonical(out), changes, shards
        super().__init__(f"{self.out} holds {shards} shard{'s' if shards != 1 else ''} made with "
                         f"another spec ({'; '.join(changes)}): {hint}")


def _fmt(value) -> str:
    if value is _MISSING:
        return "(unset)"
    return value if isinstance(value, str) else json.dumps(value)


_MISSING = object()


def changes(old: dict, cfg: GenerationConfig) -> list[str]:
    """The fields in which ``cfg`` differs from the dataset ``old`` (a manifest) in a
    way that replaces or removes shards, as ``name: old → new``; empty when none."""
    found = []
    new_spec = cfg.scene.spec()
    old_spec = old.get("spec") if isinstance(old.get("spec"), dict) else {}
    for key in sorted(set(old_spec) | set(new_spec)):
        a, b = old_spec.get(key, _MISSING), new_spec.get(key, _MISSING)
        if a != b:
            found.append(f"generation.scene.{key}: {_fmt(a)} → {_fmt(b)}")
    old_renderer = old.get("renderer") if isinstance(old.get("renderer"), dict) else {}
    new_renderer = renderer_fingerprint()
    for key in sorted(set(old_renderer) | set(new_renderer)):
        a, b = old_renderer.get(key, _MISSING), new_renderer.get(key, _MISSING)
        if a != b:
            what = "code that makes clips" if key == "code" else f"{key} version"
            found.append(f"renderer.{key} ({what}): {_fmt(a)} → {_fmt(b)}")
    dataset = old.get("dataset") if isinstance(old.get("dataset"), dict) else {}
    for key in ("seed", "scenes_per_shard"):
        if key in dataset and dataset[key] != getattr(cfg, key):
            found.append(f"generation.{key}: {_fmt(dataset[key])} → {_fmt(getattr(cfg, key))}")
    if isinstance(dataset.get("scenes"), int) and cfg.scenes < dataset["scenes"]:
        found.append(f"generation.scenes: {dataset['scenes']} → {cfg.scenes} (fewer)")
    return found


def existing_shards(out) -> list[str]:
    """Shard files in ``out`` (a directory or an object-store prefix): one listing."""
    return sorted(name for name in Location(out).listing() if SHARD_RE.fullmatch(name))


def check(cfg: GenerationConfig, hint: str = HINT) -> None:
    """Raise ``SpecChanged`` when ``cfg`` would replace or remove shards of a dataset made
    with another spec and ``cfg.overwrite`` is false. Reads only the manifest and the
    directory listing; touches nothing."""
    if cfg.overwrite:
        return
    shards = existing_shards(cfg.out)
    if not shards:
        return                      # nothing on disk to lose
    old = read_manifest(cfg.out)
    # Shard files that no manifest accounts for (someone else's, or a manifest lost or
    # corrupted) would be rendered over and removed like a changed spec's: same refusal.
    found = (["no readable manifest.json says how they were made"] if old is None
             else changes(old, cfg))
    if found:
        raise SpecChanged(cfg.out, found, len(shards), hint)
