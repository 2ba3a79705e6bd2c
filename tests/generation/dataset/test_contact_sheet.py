"""``pvit show`` on bad datasets: one line naming the file, exit 1 for bad data, never a
read outside the dataset (issue 24)."""

import json

import pytest
from typer.testing import CliRunner

from flows.cli import app
from generation.dataset.manifest import MANIFEST_NAME
from training.drawn_clips import write_shards

runner = CliRunner()


def show(directory, out):
    result = runner.invoke(app, ["show", str(directory), "--out", str(out)])
    lines = [line for line in result.output.splitlines() if line.strip()]
    return result.exit_code, lines


def edit_manifest(directory, change):
    path = directory / MANIFEST_NAME
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def test_a_good_dataset_gives_a_sheet(tmp_path):
    code, lines = show(write_shards(tmp_path / "ds", shards=1, clips_per_shard=1),
                       tmp_path / "s.png")
    assert code == 0 and (tmp_path / "s.png").stat().st_size > 0, lines


@pytest.mark.parametrize("content, message", [
    (b"", "cannot be read as a shard"),
    (b"not a tar file at all" * 100, "cannot be read as a shard"),
    (None, "cannot be read as a shard"),                    # truncated
])
def test_a_broken_shard_is_one_line_exit_1(tmp_path, content, message):
    ds = write_shards(tmp_path / "ds", shards=1, clips_per_shard=2)
    shard = next(ds.glob("*.tar"))
    data = shard.read_bytes()
    shard.write_bytes(data[:1000] if content is None else content)   # None: cut in clip 1
    code, lines = show(ds, tmp_path / "s.png")
    assert code == 1 and len(lines) == 1, lines
    assert shard.name in lines[0] and lines[0].startswith("error: "), lines
    assert not (tmp_path / "s.png").exists()


@pytest.mark.parametrize("change, message", [
    (lambda m: m.update(shards=["shard-00000.tar"]), "shard record 0 is not an object"),
    (lambda m: m["shards"][0].pop("name"), "shard record 0 has no name"),
    (lambda m: m["shards"][0].update(name="../outside.tar"), "not a file of the dataset"),
    (lambda m: m["shards"][0].update(name="/etc/passwd"), "not a file of the dataset"),
])
def test_a_bad_manifest_record_is_one_line_and_nothing_outside_is_read(tmp_path, change,
                                                                        message):
    ds = write_shards(tmp_path / "ds", shards=1, clips_per_shard=1)
    (tmp_path / "outside.tar").write_bytes(next(ds.glob("*.tar")).read_bytes())
    edit_manifest(ds, change)
    code, lines = show(ds, tmp_path / "s.png")
    assert code == 1 and len(lines) == 1 and message in lines[0], lines
    assert not (tmp_path / "s.png").exists()


def test_training_names_a_record_outside_the_dataset_instead_of_missing(tmp_path):
    from generation.dataset.index import DatasetError, open_dataset
    ds = write_shards(tmp_path / "ds", shards=1, clips_per_shard=1)
    (tmp_path / "outside.tar").write_bytes(next(ds.glob("*.tar")).read_bytes())
    edit_manifest(ds, lambda m: m["shards"][0].update(name="../outside.tar"))
    with pytest.raises(DatasetError, match="not a file of the dataset's directory"):
        open_dataset(ds)


def test_a_deeply_nested_manifest_or_journal_is_unreadable_not_a_recursion_error(tmp_path):
    # issue 24: RecursionError tracebacks in verify, show, pretrain and generate
    from generation.dataset.index import DatasetError, open_dataset
    from generation.dataset.manifest import JOURNAL_NAME, read_journal, read_manifest
    ds = write_shards(tmp_path / "ds", shards=1, clips_per_shard=1)
    good = (ds / MANIFEST_NAME).read_text()
    (ds / JOURNAL_NAME).write_text('{"shard": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    assert read_journal(ds, json.loads(good).get("spec_hash")) == []
    (ds / MANIFEST_NAME).write_text("[" * 100_000 + "]" * 100_000)
    assert read_manifest(ds) is None
    code, lines = show(ds, tmp_path / "s.png")
    assert code == 2 and len(lines) == 1 and "no shards listed" in lines[0], lines
    with pytest.raises(DatasetError, match="not a readable manifest"):
        open_dataset(ds)


def test_the_generated_sheet_never_replaces_a_users_file(tmp_path):
    # issue 24: pvit generate wrote contact_sheet.png over a user's file of that name
    import numpy as np

    from generation.dataset.contact_sheet import SHEET_NAME, store_sheet
    from generation.dataset.storage import Location
    where = Location(tmp_path)
    sheet = np.zeros((40, 80, 3), np.uint8)
    (tmp_path / SHEET_NAME).write_bytes(b"my own picture")
    assert "is not one pvit wrote" in store_sheet(where, sheet)
    assert (tmp_path / SHEET_NAME).read_bytes() == b"my own picture"
    (tmp_path / SHEET_NAME).unlink()
    assert store_sheet(where, sheet) is None                    # ours: written...
    first = (tmp_path / SHEET_NAME).read_bytes()
    assert first.startswith(b"\x89PNG")
    sheet[:, :40] = 255
    assert store_sheet(where, sheet) is None                    # ...and replaced by ours
    assert (tmp_path / SHEET_NAME).read_bytes() != first


@pytest.mark.blender
def test_flow_and_track_panels_of_a_real_render(tracked_clip):
    """Issue 26: flow and point-track columns when the clip has them; tracks drawn where
    the labels put them, occluded ones left out."""
    import numpy as np

    from generation.dataset.contact_sheet import (
        COLUMNS,
        _palette,
        columns,
        contact_sheet,
        flow_tile,
        tracks_tile,
    )

    clip = tracked_clip
    assert columns(clip) == COLUMNS + ("flow", "tracks")
    bare = {k: v for k, v in clip.items() if not k.startswith(("tracks_", "forward_"))}
    assert columns(bare) == COLUMNS
    T, H, W = clip["rgb"].shape[:3]
    scale = int(np.ceil(128 / H))
    sheet = contact_sheet(clip)
    assert sheet.shape[1] == 7 * W * scale and sheet.shape[0] == 24 + T * H * scale

    # flow: black where nothing moves (the last frame is stored as 0), bright where the
    # surface moves most, red where it moves straight right
    assert not flow_tile(clip["forward_flow"], T - 1).any()
    tile, flow = flow_tile(clip["forward_flow"], 0), clip["forward_flow"][0]
    length = np.hypot(flow[..., 0], flow[..., 1])
    assert not tile[length == 0].any()
    assert tile.max(-1)[length > 0.5 * length.max()].min() > 100
    right = (flow[..., 0] > 0.3 * length.max()) & (np.abs(flow[..., 1]) < 0.1 * flow[..., 0])
    if right.any():
        assert (tile[right].argmax(-1) == 0).all()

    # tracks: one track at a time; its dot is at its labelled position in its colour,
    # nothing is drawn for it where it is occluded
    t = T - 1
    dimmed = tracks_tile({**clip, "tracks_occluded": np.ones_like(clip["tracks_occluded"])},
                         t, scale)
    assert dimmed.max() <= 0.6 * 255 + 1            # nothing drawn: the dimmed frame alone
    seen = np.flatnonzero(~clip["tracks_occluded"][:, t])
    assert len(seen) > 10
    for q in seen[:10]:
        one = np.ones_like(clip["tracks_occluded"])
        one[q] = clip["tracks_occluded"][q]
        tile = tracks_tile({**clip, "tracks_occluded": one}, t, scale)
        x, y = np.round(clip["tracks_2d"][q, t] * scale - 0.5).astype(int)
        colour = _palette(len(clip["tracks_2d"]) + 1, 3)[1 + q]
        assert (tile[y, x] == colour).all()                 # the dot, in the track's colour
        drawn = np.argwhere((tile != dimmed).any(-1))
        assert np.abs(drawn - [y, x]).max(1).min() == 0
        one[q, t] = True                                    # occluded now: nothing drawn
        assert np.array_equal(tracks_tile({**clip, "tracks_occluded": one}, t, scale), dimmed)
