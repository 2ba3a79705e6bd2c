"""One Kubric ``AssetSource`` per manifest for the whole render process.

Kubric's recipe pattern opens an ``AssetSource`` per scene, which copies and unpacks
each asset's ``.tar.gz`` into that scene's scratch folder again (~2 ms an asset, 10-15
ms a 128 px scene). ``asset_source`` keeps one source per manifest file and version
(path, size, mtime) for the life of the process, unpacked once into its own temporary
folder, which is removed at exit. The unpacked files are read only (by Blender's OBJ
importer and PyBullet's URDF loader), so scenes cannot change them for each other.
"""

from __future__ import annotations

import atexit
import copy
import functools
from pathlib import Path

import kubric as kb

_sources: dict[tuple, object] = {}


def _close_all() -> None:
    for source in _sources.values():
        try:
            source.close()      # removes its unpacked files
        except OSError:
            pass                # already gone with the scratch folder it was made in
    _sources.clear()


@functools.cache
def _source_class():
    class ReusedAssetSource(kb.AssetSource):
        def create(self, asset_id: str, add_metadata: bool = True, **kwargs):
            # Kubric's create() updates the manifest entry's kwargs in place, so the
            # kwargs of one call (a scene's object name) would become the defaults of
            # every later call on this long-lived source; give it a copy to update.
            entry = self._assets.get(asset_id)
            if entry is None:
                return super().create(asset_id, add_metadata, **kwargs)
            self._assets[asset_id] = copy.deepcopy(entry)
            try:
                return super().create(asset_id, add_metadata, **kwargs)
            finally:
                self._assets[asset_id] = entry

    return ReusedAssetSource


def asset_source(manifest: Path, scratch_root: Path | None = None):
    """The process's ``kb.AssetSource`` for ``manifest`` (made on first use; Kubric
    unpacks into a temporary folder under ``scratch_root`` or the system's). Do not
    close it: that happens at exit."""
    path = Path(manifest).resolve()
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns, str(scratch_root))
    if key not in _sources:
        if not _sources:
            atexit.register(_close_all)
        _sources[key] = _source_class().from_manifest(str(path), scratch_dir=scratch_root)
    return _sources[key]
