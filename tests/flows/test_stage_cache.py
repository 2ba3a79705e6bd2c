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
    stage_cache.begin(out, "k1")
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
    stage_cache.begin(out, "k2")                      # another key: a clean directory
    assert not (out / "checkpoints").exists()
    assert stage_cache.state(out, "k2") == "resumable"
