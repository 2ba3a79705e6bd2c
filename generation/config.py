"""Typed config of the ``generation`` stage (one section of the experiment YAML).

Everything that changes pixels or labels lives in ``SceneConfig``; its hash keys the
shards, so changing any of it renders again. ``GenerationConfig`` adds what only
decides how much is rendered and how (scene count, shard size, workers, retries).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    field_serializer,
    field_validator,
    model_validator,
)

from generation.dataset import asset_store
from generation.dataset.actor_format import ACTION_NAMES, ACTOR_RECIPES, JOINT_NAMES
from generation.dataset.manifest import MAX_SCENES, renderer_fingerprint
from generation.dataset.shard_format import class_list
from generation.dataset.storage import dataset_path
from generation.render.assets import DEFAULT_MANIFEST, load_manifest
from generation.render.object_assets import ASSET_SETS
from generation.render.recipes import RECIPE_ASSET_SET, RECIPES

# recipes that take actors when asked (``max_actors``); humanoid always has them
PEOPLE_OPTIONAL = frozenset({"movi_c", "movi_e", "movi_f"})

# The presets of ``SceneConfig.quality``, chosen with ``benchmarks/render.py --quality``
# (movi_c, 128 px, CPU, against 1024 spp; docs/performance.md, "Quality per second"):
# standard is the cheapest setting within 0.5 dB PSNR of Kubric's default (128 spp +
# denoising), which measured as that default itself (64 spp + denoising: -0.9 dB at
# 0.55x); draft the most that 0.25x its cost buys (-3.1 dB, 0.21x); high twice the
# samples. Adaptive sampling left off: up to 64 spp it rendered the same images.
QUALITY_PRESETS = {
    "draft": {"spp": 16, "denoise": True, "adaptive": False},
    "standard": {"spp": 128, "denoise": True, "adaptive": False},
    "high": {"spp": 256, "denoise": True, "adaptive": False},
}


class SceneConfig(BaseModel):
    """What one rendered clip looks like. Every field here affects pixels or labels."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    recipe: str = "movi"                    # name in generation.render.recipes.RECIPES
    resolution: int = Field(64, gt=0, le=4096, description="square frame size, pixels")
    frames: int = Field(4, gt=0, le=1000, description="frames per clip (T)")
    fps: int = Field(12, gt=0, le=240)
    spp: int = Field(16, gt=0, le=16384,
                     description="Cycles samples per pixel (RGB layer)")
    denoise: bool = False                   # OpenImageDenoise on the RGB layer
    # Cycles adaptive sampling on the RGB layer (``spp`` is then its maximum)
    adaptive: bool = False
    # A named preset fills spp / denoise / adaptive in (QUALITY_PRESETS); custom uses the
    # three fields as given. Kept in the spec (so in its hash) beside what it set.
    quality: Literal["custom", "draft", "standard", "high"] = Field(
        "custom", description="render quality preset: draft | standard | high set spp, "
        "denoise and adaptive (docs/generation.md, \"Quality\"); custom: use those fields")
    min_objects: int = Field(3, ge=1, le=64)
    max_objects: int = Field(10, ge=1, le=64)
    camera_motion: bool = True              # camera moves along a small arc
    asset_manifest: Path = DEFAULT_MANIFEST  # a local Kubric asset manifest
    assets: Optional[list[str]] = None      # subset of asset ids (None = all)
    flow: bool = False                      # also store optical flow
    object_coordinates: bool = False        # also store object coordinates
    # point tracks per clip (generation/render/tracks.py); 0 = none, and a spec without
    # them renders the bytes it always did
    tracks: int = Field(0, ge=0, le=100_000, description="point tracks per clip (0: none)")

    # movi_f only: Cycles motion blur, the shutter centred on each frame
    shutter: float = Field(0.5, gt=0.0, le=1.0, description="movi_f's motion-blur shutter, "
                           "in frames (labels are for its centre)")

    # people (generation/render/recipes/humanoid.py): humanoid has 1-3 actors by default,
    # movi_c / movi_e / movi_f none unless max_actors asks for them, movi never
    actions: Optional[list[str]] = Field(None, description="motions the actors play (None: "
                                         "all of the manifest's action_names)")
    min_actors: int = Field(None, ge=0, le=3, validate_default=False,
                            description="fewest actors (default: humanoid 1, others 0)")
    max_actors: int = Field(None, ge=0, le=3, validate_default=False,
                            description="most actors (default: humanoid 3, others 0; movi_c, "
                            "movi_e and movi_f take up to 3)")
    domain: Literal["source", "heldout"] = Field(
        "source", description="humanoid looks: heldout draws other worlds, materials, "
        "camera ranges and body heights than source (a held-out test domain)")

    @model_validator(mode="before")
    @classmethod
    def _quality(cls, data: Any) -> Any:
        """A named ``quality`` sets spp, denoise and adaptive; naming one of them too is
        an error (which would win is not obvious)."""
        if isinstance(data, dict) and data.get("quality", "custom") in QUALITY_PRESETS:
            preset = QUALITY_PRESETS[data["quality"]]
            given = sorted(set(preset) & set(data))
            clash = [k for k in given if data[k] != preset[k]]
            if clash:
                raise ValueError(f"quality {data['quality']!r} sets {', '.join(clash)}; "
                                 "leave them out or use quality: custom")
            data = {**data, **preset}
        return data

    @model_validator(mode="before")
    @classmethod
    def _actor_defaults(cls, data: Any) -> Any:
        """Unset actor counts are the recipe's: 1-3 for humanoid, none for the others."""
        if isinstance(data, dict):
            people = data.get("recipe") in ACTOR_RECIPES
            data = {"min_actors": 1 if people else 0, "max_actors": 3 if people else 0,
                    **{k: v for k, v in data.items() if v is not None or
                       k not in ("min_actors", "max_actors")}}
        return data

    @model_validator(mode="before")
    @classmethod
    def _asset_set(cls, data: Any) -> Any:
        """``asset_manifest`` may name an asset set (``objects``); left out, it is the
        recipe's own set (``RECIPE_ASSET_SET``), else the shapes."""
        if isinstance(data, dict):
            value = data.get("asset_manifest", RECIPE_ASSET_SET.get(data.get("recipe")))
            if isinstance(value, str) and value in ASSET_SETS:
                value = ASSET_SETS[value]
            if value is not None:
                data = {**data, "asset_manifest": value}
        return data

    @model_validator(mode="after")
    def _check(self) -> "SceneConfig":
        if self.min_objects > self.max_objects:
            raise ValueError(f"min_objects ({self.min_objects}) > max_objects ({self.max_objects})")
        if self.min_actors > self.max_actors:
            raise ValueError(f"min_actors ({self.min_actors}) > max_actors ({self.max_actors})")
        if self.recipe in ACTOR_RECIPES and self.min_actors < 1:
            raise ValueError(f"min_actors: a {self.recipe} scene has at least one actor")
        if self.max_actors and self.recipe not in ACTOR_RECIPES | PEOPLE_OPTIONAL:
            raise ValueError(f"max_actors: recipe {self.recipe!r} has no actors (recipes "
                             f"with people: {sorted(ACTOR_RECIPES | PEOPLE_OPTIONAL)})")
        if self.actions is not None:
            unknown = sorted(set(self.actions) - set(ACTION_NAMES))
            if unknown or not self.actions:
                raise ValueError(f"unknown action(s) {unknown} (known: {list(ACTION_NAMES)})")
        if self.recipe not in RECIPES:
            raise ValueError(f"unknown recipe {self.recipe!r} (known: {sorted(RECIPES)})")
        manifest = load_manifest(self.asset_manifest)
        if self.assets is not None:
            unknown = sorted(set(self.assets) - set(manifest["assets"]))
            if unknown or not self.assets:
                raise ValueError(f"unknown asset(s) {unknown} in {self.asset_manifest} "
                                 f"(known: {sorted(manifest['assets'])})")
        return self

    def spec(self) -> dict:
        """This config as a dataset's manifest records it and a render job carries it: the
        asset set named by its content (``sha256:<hex>`` of its manifest and archives,
        ``generation.dataset.asset_store``), never by this machine's path to it."""
        return {**self.model_dump(mode="json"),
                "asset_manifest": asset_store.digest(self.asset_manifest)}

    def digest(self) -> str:
        """Content hash of everything that determines a clip: this spec (the asset set's
        bytes included), and the renderer's versions and code (``renderer_fingerprint``)."""
        data = self.spec()
        data["renderer"] = renderer_fingerprint()
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()

    def classes(self) -> list[str]:
        """The semantic classes its clips label: the fixed list, then any extra
        categories of the asset manifest, then "person" and the body parts for a recipe
        with people (what the manifest's ``classes`` records)."""
        return class_list(load_manifest(self.asset_manifest), actors=self.max_actors > 0)

    def actor_names(self) -> dict:
        """What the manifest adds for a recipe with people: the names its clips'
        ``actor_action`` and joint axis index (``actor_format``); else nothing."""
        if self.max_actors == 0:
            return {}
        return {"action_names": list(ACTION_NAMES), "joint_names": list(JOINT_NAMES)}




class GenerationConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    out: Path = Field(Path("data/synthetic"), description="shard directory, or object-store "
                      "URL (s3://bucket/prefix)")
    scenes: int = Field(8, gt=0, description=f"number of clips (at most {MAX_SCENES:,})")
    scenes_per_shard: int = Field(4, gt=0, description="clips per shard")
    # generation/dataset/plan.py scene_seed()
    seed: int = Field(0, ge=0, description="dataset seed: clip i renders from (seed, i)")
    workers: int = Field(1, gt=0, le=256, description="shards rendered at once (one process "
                         "each)")
    # Blender threads per render worker; None = this machine's cores / workers. Cycles'
    # output does not depend on it (shards stay byte-identical).
    render_threads: Optional[int] = Field(None, gt=0, le=1024)
    retries: int = Field(2, ge=0, le=20, description="re-runs of a crashed render worker")
    # generation/render/devices.py. Recorded per shard, not part of the spec hash: labels
    # are the same on every device and RGB differs by sampling noise only
    # (docs/generation.md, "Render devices").
    device: Literal["auto", "cpu", "cuda", "optix"] = Field(
        "auto", description="Cycles device; auto: OptiX, then CUDA, then CPU")
    # consecutive shards share one GPU; `workers` is still how many shards render at
    # once, so set it to GPUs x workers_per_gpu
    workers_per_gpu: int = Field(1, gt=0, le=64, description="render workers sharing one GPU")
    task_runner: Literal["threads", "processes", "dask"] = Field(
        "threads", description="Prefect task runner of the shard tasks")
    dask_address: Optional[str] = None      # existing Dask scheduler; None = LocalCluster
    # generation/dataset/spec_change.py names the changed fields
    overwrite: bool = Field(False, description="replace a dataset made with another spec (each "
                            "old shard stays until its replacement is rendered); without it "
                            "such a run exits naming the changed fields")
    # The LocalCluster's dashboard ("127.0.0.1:8787", ":0"); None = no dashboard at all.
    dask_dashboard: Optional[str] = None
    # Task runs one flow run may create: above this many shards a task renders several
    # shards in sequence (ceil(shards / this) each), so that a large dataset never floods
    # the Prefect server with task runs (see docs/deployment.md, "Sizing").
    max_tasks_per_flow: int = Field(500, ge=1, le=100_000)
    scene: SceneConfig = Field(default_factory=SceneConfig)

    @field_validator("scenes")
    @classmethod
    def _check_scenes(cls, value: int) -> int:
        if value > MAX_SCENES:
            raise ValueError(f"{value} clips is more than one dataset may hold (at most "
                             f"{MAX_SCENES:,}); split it into several `out` directories")
        return value

    @field_validator("out", mode="before")
    @classmethod
    def _check_out(cls, value: Any) -> Path:
        # a run parameter: refuse schemes (pipe:...) before anything opens the directory
        return dataset_path(value)

    @field_serializer("out", when_used="json")
    def _dump_out(self, value: Path | str) -> str:
        # a Path spells s3://b/p as s3:/b/p: Prefect's run parameters, the experiment YAML
        # a run writes and the deployment form show the URL itself
        return str(dataset_path(value))
