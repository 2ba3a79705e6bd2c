"""Shared test setup.

Import order matters in one process: TensorFlow (imported by ``kubric``) loaded
before torch's triton (imported by torchvision/timm through ``torch._dynamo``)
crashes the interpreter. The pipeline never loads both in one process (Blender and
Kubric run in render workers), but pytest does, so load torch's side first.
"""

import contextlib
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Every Prefect run of the suite (in-process or in `pvit` subprocesses) uses its own
# database, not ~/.prefect: runs stay isolated from the user's and from other suites.
_ROOT = None
if "PREFECT_HOME" not in os.environ:
    _ROOT = Path(tempfile.mkdtemp(prefix="pvit-tests-prefect-"))
    os.environ["PREFECT_HOME"] = str(_ROOT / "prefect-home")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# As `pvit` itself does (flows/cli.py): in-process flows on a loaded 2-core machine
# need more than Prefect's 20 s for the temporary server to start.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

import pytest  # noqa: E402
import torch  # noqa: E402,F401
import torch._dynamo  # noqa: E402,F401

_SERVER = contextlib.ExitStack()


def pytest_configure(config):
    """One real ``prefect server start`` for the whole suite (127.0.0.1, a free port, the
    suite's Prefect home), used by every in-process flow and every ``pvit`` subprocess: a
    temporary server per command cost ~6 s of start-up each, over ~75 commands. Not when
    the user points the suite at a server (``PREFECT_API_URL``) or names its own home, or
    with ``PVIT_TESTS_PREFECT=temporary``: Prefect's default of a temporary server per
    process, which tests/flows/test_server_lifetime.py and the main pipeline test
    (tests/flows/test_pipeline.py, ``on_a_laptop``) exercise anyway."""
    if (_ROOT is None or "PREFECT_API_URL" in os.environ
            or os.environ.get("PVIT_TESTS_PREFECT") == "temporary"):
        return
    sys.path.insert(0, str(Path(__file__).parent / "flows"))
    from prefect_deployment import running_prefect_server
    env = _SERVER.enter_context(running_prefect_server(_ROOT))
    assert env["PREFECT_HOME"] == os.environ["PREFECT_HOME"]
    os.environ["PREFECT_API_URL"] = os.environ["PVIT_TESTS_SERVER"] = env["PREFECT_API_URL"]


def pytest_unconfigure(config):
    """Stop the suite's Prefect servers (the in-process flows' temporary one, if any, and
    the shared one), then remove the suite's Prefect home (its database grows to ~16 MB a
    run) unless the user named one. Prefect would stop its temporary server at exit,
    logging to pytest's capture streams after they are closed (a "--- Logging error ---"
    block at the end of every run)."""
    # first what the flows still send it: logs and events queued in background workers
    for module, worker in (("prefect.logging.handlers", "APILogWorker"),
                           ("prefect.events.worker", "EventsWorker")):
        if module in sys.modules:
            getattr(sys.modules[module], worker).drain_all(timeout=5)
    server = sys.modules.get("prefect.server.api.server")
    if server is not None:
        for instance in list(server.SubprocessASGIServer._instances.values()):
            instance.stop()
    _SERVER.close()
    if _ROOT is not None:
        import shutil
        shutil.rmtree(_ROOT, ignore_errors=True)


# Made once per session and shared by tests/training and tests/flows (the commands).
@pytest.fixture(scope="session")
def shard_dir(tmp_path_factory) -> Path:
    """Drawn-clip shards (training.drawn_clips): a synthetic dataset without Blender."""
    from training.drawn_clips import write_shards
    return write_shards(tmp_path_factory.mktemp("shards"))


@pytest.fixture(scope="session")
def toy_set(tmp_path_factory) -> dict:
    """The toy action set (webm in the SSv2 layout, mp4 in the list layout)."""
    from training.toy_actions import write_toy_actions
    return write_toy_actions(tmp_path_factory.mktemp("toy") / "actions", clips_per_class=3,
                             val_per_class=1, size=48, frames=16)


@pytest.fixture(scope="session")
def rendered_clip():
    """One tiny clip rendered in this process (Blender + Kubric), for the label and
    shard-format tests."""
    from generation.config import SceneConfig
    from generation.render.scene import render_clip

    cfg = SceneConfig(resolution=48, frames=3, spp=4, min_objects=4, max_objects=6,
                      object_coordinates=True, flow=True)
    clip, _ = render_clip(cfg, seed=7, key="scene0000007")
    return clip


@pytest.fixture(scope="session")
def tracked_clip():
    """``rendered_clip``'s scene again with point tracks on (the point-track and
    ``pvit verify --labels`` tests): every other field must come out the same."""
    from generation.config import SceneConfig
    from generation.render.scene import render_clip

    cfg = SceneConfig(resolution=48, frames=3, spp=4, min_objects=4, max_objects=6,
                      object_coordinates=True, flow=True, tracks=192)
    clip, _ = render_clip(cfg, seed=7, key="scene0000007")
    return clip
