from flows import stage_cache


def test_keys_change_with_section_upstream_and_code():
    base = stage_cache.stage_key("finetune", {"lr": 1e-4}, {"init": "abc"}, "v1")
    assert base == stage_cache.stage_key("finetune", {"lr": 1e-4}, {"init": "abc"}, "v1")
    assert base != stage_cache.stage_key("finetune", {"lr": 2e-4}, {"init": "abc"}, "v1")
    assert base != stage_cache.stage_key("finetune", {"lr": 1e-4}, {"init": "abd"}, "v1")
    assert base != stage_cache.stage_key("finetune", {"lr": 1e-4}, {"init": "abc"}, "v2")
    assert base != stage_cache.stage_key("pretrain", {"lr": 1e-4}, {"init": "abc"}, "v1")


def test_code_version_tracks_sources():
    assert stage_cache.code_version("training") != stage_cache.code_version("generation")
    assert stage_cache.code_version("training") == stage_cache.code_version("training")


def test_states_resume_and_clear(tmp_path):
    out = tmp_path / "run"
    assert stage_cache.state(out, "k1") == "stale"
    stage_cache.begin(out, "k1", owned=["checkpoints"])
    (out / "checkpoints").mkdir()
    (out / "checkpoints" / "last.pt").write_text("step 7")
    assert stage_cache.state(out, "k1") == "resumable"
    stage_cache.begin(out, "k1")                      # a retry keeps what it can resume from
    assert (out / "checkpoints" / "last.pt").read_text() == "step 7"
    (out / "checkpoints" / "final.pt").write_text("done")
    stage_cache.finish(out, "k1", {"top1": 1.0}, ["checkpoints/final.pt"])
    assert stage_cache.state(out, "k1") == "done"
    assert stage_cache.read_record(out)["summary"] == {"top1": 1.0}
    (out / "checkpoints" / "final.pt").unlink()      # an output went missing: not done
    assert stage_cache.state(out, "k1") == "resumable"
    stage_cache.begin(out, "k2")                      # another key: what k1 owned goes
    assert not (out / "checkpoints").exists()
    assert stage_cache.state(out, "k2") == "resumable"


def someones_directory(path):
    (path / "sub").mkdir(parents=True)
    (path / "important.txt").write_text("keep me")
    (path / "sub" / "thesis.tex").write_text("\\begin{document}")
    return path


def intact(path):
    return ((path / "important.txt").read_text() == "keep me"
            and (path / "sub" / "thesis.tex").read_text() == "\\begin{document}")


def test_begin_never_clears_a_directory_without_a_stage_record(tmp_path):
    import pytest
    out = someones_directory(tmp_path / "mine")
    assert stage_cache.foreign(out)
    with pytest.raises(stage_cache.ForeignDirectory, match="not a pvit stage output"):
        stage_cache.begin(out, "k1")
    assert intact(out) and not (out / stage_cache.RECORD).exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert stage_cache.foreign(empty) is None       # an empty directory is fine
    stage_cache.begin(empty, "k1")
    assert stage_cache.state(empty, "k1") == "resumable"


def test_force_invalidates_only_stage_outputs(tmp_path):
    from flows.experiment import ExperimentConfig, ToyActionsConfig
    from flows.pipeline import force_stage

    foreign = someones_directory(tmp_path / "toy")
    cfg = ExperimentConfig(toy_actions=ToyActionsConfig(out=foreign),
                           generation={"out": str(someones_directory(tmp_path / "shards"))})
    (tmp_path / "shards" / "manifest.json").write_text('{"not": "a pvit manifest"}')
    force_stage(cfg, "toy_actions")
    force_stage(cfg, "generate")
    assert intact(foreign) and intact(tmp_path / "shards")
    assert (tmp_path / "shards" / "manifest.json").is_file()

    ours = tmp_path / "ours"
    stage_cache.begin(ours, "k1", owned=["set"])
    (ours / "set").mkdir()
    stage_cache.finish(ours, "k1", {}, ["set"])
    force_stage(ExperimentConfig(toy_actions=ToyActionsConfig(out=ours)), "toy_actions")
    assert stage_cache.state(ours, "k1") == "stale" and (ours / "set").is_dir()
    stage_cache.begin(ours, "k1", owned=["set"])     # the stage itself clears it
    assert not (ours / "set").exists()


def test_toy_actions_never_replace_someone_elses_directory(tmp_path):
    import pytest

    from training.toy_actions import write_toy_actions
    small = dict(clips_per_class=2, val_per_class=1, size=16, frames=4)
    out = someones_directory(tmp_path / "set")
    with pytest.raises(ValueError, match="not a video set written here"):
        write_toy_actions(out, **small)
    assert intact(out) and not (tmp_path / "set.tmp").exists()
    tmp = someones_directory(tmp_path / "other.tmp")  # a directory that merely has the name
    with pytest.raises(ValueError, match="not a video set written here"):
        write_toy_actions(tmp_path / "other", **small)
    assert intact(tmp)
    fresh = tmp_path / "fresh"
    write_toy_actions(fresh, **small)
    write_toy_actions(fresh, **{**small, "seed": 1})  # its own set is replaced
    assert (fresh / "ssv2" / "labels" / "labels.json").is_file()


def test_a_stale_stage_removes_only_what_it_wrote_and_names_what_it_kept(tmp_path, caplog):
    # issue 24: a stale stage removed the whole directory, the user's files with it
    out = tmp_path / "run"
    stage_cache.begin(out, "k1", owned=["checkpoints", "summary.json"])
    (out / "checkpoints").mkdir()
    (out / "checkpoints" / "final.pt").write_text("done")
    (out / "summary.json").write_text("{}")
    stage_cache.finish(out, "k1", {}, ["checkpoints/final.pt"])
    (out / "NOTES.txt").write_text("my notes")
    (out / "my_plots").mkdir()
    (out / "my_plots" / "a.png").write_text("png")
    with caplog.at_level("WARNING", logger="flows.stage_cache"):
        stage_cache.begin(out, "k2", owned=["summary.json"])
    assert sorted(p.name for p in out.iterdir()) == [".stage.json", "NOTES.txt", "my_plots"]
    assert (out / "my_plots" / "a.png").read_text() == "png"
    assert "kept NOTES.txt, my_plots" in caplog.text
    # what k1's record said it owned is remembered: checkpoints went though k2 never named it
    assert stage_cache.read_record(out)["owned"] == ["checkpoints", "summary.json"]


def test_a_record_naming_a_path_outside_its_directory_touches_nothing(tmp_path):
    import json

    import pytest
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    out = tmp_path / "run"
    out.mkdir()
    (out / stage_cache.RECORD).write_text(json.dumps({"key": "old", "owned": ["../victim.txt"]}))
    with pytest.raises(ValueError, match="not a name inside the stage directory"):
        stage_cache.begin(out, "new")
    assert victim.read_text() == "keep"
