"""``humanoid_actions``: a downstream action-recognition set rendered from the ``humanoid``
recipe, the controlled downstream task of the study (issue 28).

Each class is one motion of DeepMimic's motion capture; each clip is one actor playing
it (random phase, speed, mirroring, heading, height and looks; ``scene.domain: heldout``
by default, so the set's looks are not those of the synthetic training data). A class is
one shard dataset of its own (``OUT/render/<action>/``, rendered by the
``generate_dataset`` flow: cached, incremental, verifiable like any dataset), and the set
(``OUT/set/{list,ssv2}``) is written from their RGB as encoded videos, so fine-tuning and
evaluation read it exactly as they read real data. Splits are fixed by clip index
before anything is rendered: the first ``train_per_class`` clips of a class train, the
next ``validation_per_class`` validate, the rest are the test split.
"""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.states import Completed, State

from flows import stage_cache
from flows.experiment import HumanoidActionsConfig
from flows.generate import generate_dataset
from flows.run_view import location_name, reused
from flows.train import cached, reuse_message
from generation.dataset.actor_format import ACTION_NAMES
from generation.dataset.index import open_dataset
from generation.dataset.manifest import renderer_fingerprint
from generation.dataset.shard_format import read_shard
from training import files
from training.video_set import VideoSetWriter

RENDERS = "render"      # OUT/render/<action>/: the stage keeps them across runs
SET = "set"


def split_of(index: int, cfg: HumanoidActionsConfig) -> str:
    """The split of a class's clip ``index`` (fixed before any result is seen)."""
    if index < cfg.train_per_class:
        return "train"
    if index < cfg.train_per_class + cfg.validation_per_class:
        return "validation"
    return "test"


def write_action_set(cfg: HumanoidActionsConfig) -> dict:
    """Write ``OUT/set`` from the classes' rendered datasets; returns its summary. Each
    clip's actor must play its class's motion (a dataset rendered for another class, or
    by hand, fails here rather than teaching the wrong label)."""
    writer = VideoSetWriter(files.join(cfg.out, SET), writer="flows.actions.write_action_set",
                            fps=cfg.scene.fps)
    for label, action in enumerate(cfg.actions):
        index = open_dataset(str(cfg.generation(action).out))
        clips = [clip for shard in index.shards for clip in read_shard(shard.url)]
        clips.sort(key=lambda clip: clip["key"])
        if len(clips) != cfg.clips_per_class:
            raise ValueError(f"{index.location}: {len(clips)} clips, the set needs "
                             f"{cfg.clips_per_class}")
        for i, clip in enumerate(clips):
            played = [ACTION_NAMES[a] for a in clip["actor_action"]]
            if played != [action]:
                raise ValueError(f"{index.location}: clip {clip['key']} shows {played}, "
                                 f"not one actor playing {action}")
            writer.add(str(100_000 * (label + 1) + i), clip["rgb"], label, action,
                       split_of(i, cfg))
    return writer.finish(list(cfg.actions))


def stage_key(cfg: HumanoidActionsConfig) -> str:
    """Its config, the renderer that makes its clips and the code that writes the set:
    the renders are a pure function of these, so the key is known before rendering."""
    return stage_cache.stage_key("humanoid_actions", cfg.model_dump(mode="json"),
                                 {"renderer": renderer_fingerprint()},
                                 stage_cache.code_version("training"))


@task(name="write-action-set", task_run_name="write-action-set", result_serializer="json")
def write_action_set_task(cfg: HumanoidActionsConfig) -> dict:
    return write_action_set(cfg)


def _run_name() -> str:
    from prefect.runtime import flow_run
    config = flow_run.parameters.get("config")
    out = config.get("out") if isinstance(config, dict) else getattr(config, "out", "")
    return f"humanoid-actions-{location_name(out)}"


@flow(name="humanoid_actions", flow_run_name=_run_name, persist_result=True,
      result_serializer="json")
def humanoid_actions(config: HumanoidActionsConfig) -> State[dict]:
    """Render the classes' clips that are missing and write the video set.

    Args:
        config: the experiment file's `humanoid_actions` section (docs/training.md)
    """
    out = config.out      # a directory or an object-store prefix
    key = stage_key(config)
    summary = cached("humanoid_actions", out, key)
    if summary is not None:
        return reused(reuse_message(out), summary)
    stage_cache.begin(out, key, owned=[SET, f"{SET}.tmp"], keep=[RENDERS])
    for action in config.actions:
        generate_dataset(config.generation(action))
    summary = write_action_set_task(config)
    stage_cache.finish(out, key, summary, [SET])
    get_run_logger().info("action set %s: %s", files.join(out, SET), summary)
    return Completed(message=f"computed into {out}", data=summary)
