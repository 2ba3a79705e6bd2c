from pathlib import Path

import pytest

from training.drawn_clips import write_shards


@pytest.fixture(scope="session")
def shard_dir(tmp_path_factory) -> Path:
    return write_shards(tmp_path_factory.mktemp("shards"))


@pytest.fixture(scope="session")
def toy_set(tmp_path_factory) -> dict:
    """The toy action set (webm in the SSv2 layout, mp4 in the list layout)."""
    from training.toy_actions import write_toy_actions
    return write_toy_actions(tmp_path_factory.mktemp("toy") / "actions", clips_per_class=3,
                             val_per_class=1, size=48, frames=16)
