"""Dataset locations never reach a shell: webdataset's gopen runs ``pipe:CMD`` with
``shell=True``, and a location is a config value or a flag of a deployment run."""

import json
from pathlib import Path

import pytest
import yaml
from pvit_cli import pvit, write_config

from generation.dataset.shard_format import read_shard, write_shard
from generation.dataset.storage import LocationError, dataset_path, shard_url
from training.drawn_clips import make_clip, write_shards

PIPE = "pipe:touch PWNED;w"   # relative to the command's cwd: PWNED lands in tmp_path


@pytest.mark.parametrize("location, path", [
    ("data/shards", Path("data/shards")),
    ("/data/shards", Path("/data/shards")),
    ("data/pipe:x", Path("data/pipe:x")),          # a colon after a slash is no scheme
    ("file:///data/my%20shards", Path("/data/my shards")),
    ("file:/data/shards", Path("/data/shards")),   # what typer's Path makes of file:///
])
def test_paths_and_file_urls_are_local_directories(location, path):
    assert dataset_path(location) == path


@pytest.mark.parametrize("location, url", [
    ("s3://bucket/shards", "s3://bucket/shards"),
    ("s3://bucket/shards/", "s3://bucket/shards"),
    ("s3:/bucket/shards", "s3://bucket/shards"),     # what typer's Path makes of s3://
    ("gs://bucket/a/b", "gs://bucket/a/b"),
])
def test_object_store_urls_are_kept_as_urls(location, url):
    assert dataset_path(location) == url


@pytest.mark.parametrize("location, message", [
    (PIPE, "scheme 'pipe:' is not supported"),
    ("pipe:x", "scheme 'pipe:' is not supported"),      # ambiguous: a file or a command
    ("PIPE:x", "scheme 'pipe:' is not supported"),      # schemes are case-insensitive
    ("https://example.com/shards", "scheme 'https:' is not supported"),
    ("s3://bucket/shards?x=1", "takes no ?query"),
    ("s3://", "names a bucket and a prefix"),
    ("file://otherhost/shards", "absolute local path"),
    (3, "expected a directory path"),
])
def test_other_schemes_are_refused(location, message):
    with pytest.raises(LocationError) as info:
        dataset_path(location)
    assert message in str(info.value)


def _generate(tmp_path):
    cfg = write_config(tmp_path / "c.yaml", tmp_path / "ds")
    return ["generate", cfg, "--out", PIPE]


def _pretrain(tmp_path):
    # the directory exists, so without the check training would open its shards
    write_shards(tmp_path / PIPE, shards=1, clips_per_shard=2, frames=4, size=32)
    exp = tmp_path / "exp.yaml"
    exp.write_text(yaml.safe_dump({"pretrain": dict(
        model="pvit_test", num_frames=4, img_size=32, label_size=16, pose_slots=3,
        num_workers=0, batch_size=2, epochs=1, out=str(tmp_path / "pre"))}))
    return ["pretrain", exp, "--synthetic", PIPE]


def _pipeline(tmp_path):
    return ["pipeline", write_config(tmp_path / "c.yaml", PIPE)]


def _show(tmp_path):
    return ["show", PIPE, "--out", tmp_path / "sheet.png"]


@pytest.mark.parametrize("command", [_generate, _pretrain, _pipeline, _show],
                         ids=["generate --out", "pretrain --synthetic", "pipeline generation.out",
                              "show DIR"])
def test_a_pipe_location_is_refused_and_runs_nothing(tmp_path, command):
    result = pvit(*command(tmp_path), cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
    assert "scheme 'pipe:' is not supported" in result.stderr
    assert not (tmp_path / "PWNED").exists()


def test_shard_paths_that_look_like_urls_are_opened_as_files(tmp_path, monkeypatch):
    """Writer and both readers open the file named ``pipe:touch PWNED;w`` (and one with
    URL syntax in it) instead of running it."""
    from training.synthetic_data import SceneTransform, shard_urls, synthetic_dataset

    monkeypatch.chdir(tmp_path)
    clips = [make_clip(f"scene{i:07d}", seed=i, frames=4, size=32) for i in range(2)]
    for name in (PIPE, "odd #1?x=%20.tar"):
        assert write_shard(Path(name), clips) == 2
        # training's pipeline, given the file: URL open_dataset makes of the name
        read = synthetic_dataset([shard_url(name)], None, seed=0, shuffle_buffer=1,
                                 split_by_node=False)
        assert [c["key"] for c in read] == ["scene0000000", "scene0000001"]
        assert [c["key"] for c in read_shard(Path(name))] == ["scene0000000", "scene0000001"]

    # a dataset location that reads as a command is refused; a shard name that does is
    # opened as the file it names
    from generation.dataset.index import DatasetError
    with pytest.raises(DatasetError, match="scheme 'pipe:' is not supported"):
        shard_urls(Path("pipe:touch PWNED;d"))
    directory = Path("data")
    write_shards(directory, shards=1, clips_per_shard=2, frames=4, size=32)
    manifest = json.loads((directory / "manifest.json").read_text())
    (directory / "shard-00000.tar").rename(directory / PIPE)
    manifest["shards"][0]["name"] = PIPE
    (directory / "manifest.json").write_text(json.dumps(manifest))
    transform = SceneTransform(num_frames=4, img_size=32, label_size=16, depth_max_m=10.0,
                               pose_slots=3, crop_scale=(1.0, 1.0), flip=False, train=True,
                               seed=0)
    samples = list(synthetic_dataset(shard_urls(directory), transform, seed=0,
                                     shuffle_buffer=2, split_by_node=False))
    assert len(samples) == 2 and samples[0]["video"].shape == (3, 4, 32, 32)
    assert not (tmp_path / "PWNED").exists()


def test_an_object_store_without_its_package_is_one_line(tmp_path):
    import importlib.util
    if importlib.util.find_spec("gcsfs") is not None:
        pytest.skip("gcsfs is installed here")
    for args in (["verify", "gs://bucket/ds"],
                 ["generate", write_config(tmp_path / "c.yaml", "gs://bucket/ds")]):
        result = pvit(*args, cwd=tmp_path)
        assert result.returncode == 2, result.stderr
        assert "Traceback" not in result.stderr, result.stderr
        lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
        assert len(lines) == 1 and "gs:// needs the gcsfs package" in lines[0], lines


def test_a_file_url_with_a_host_is_refused_from_the_command_line_too(tmp_path):
    # issue 24: typer's Path collapsed file://HOST/p to file:/HOST/p, read as /HOST/p
    (tmp_path / "HOST").mkdir()
    url = f"file://HOST{tmp_path}"
    for args in (("verify", url), ("show", url, "--out", tmp_path / "s.png")):
        result = pvit(*args)
        assert result.returncode == 2, result.stderr
        assert "must name an absolute local path" in result.stderr
    config = write_config(tmp_path / "c.yaml", tmp_path / "ds")
    result = pvit("generate", config, "--out", url)
    assert result.returncode == 2 and "must name an absolute local path" in result.stderr
