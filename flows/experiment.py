"""The experiment file: one YAML with a section per stage, validated as a whole.

Every command takes the whole file and reads its sections, so ``pvit generate``,
``pvit pretrain`` and ``pvit pipeline`` all run from the same ``configs/demo.yaml``.
CLI flags become ``overrides``: a dict of dotted paths (``generation.scene.frames``)
applied before validation, so a bad flag is reported exactly like a bad key.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from generation.config import GenerationConfig, SceneConfig
from generation.dataset.actor_format import ACTION_NAMES
from training import files
from training.config import EvaluateConfig, FinetuneConfig, PretrainConfig

# An experiment file is a few KB; reading (and quoting) more is only ever a mistake or an
# attack: a 34 MB file once made a 27 MB error line.
MAX_CONFIG_BYTES = 1 << 20
# What an error line may quote of the input.
MAX_ERROR_CHARS = 300


class ConfigError(ValueError):
    """One line naming the file/field that is wrong (the CLI exits with code 2), at most
    ``MAX_ERROR_CHARS`` long whatever the input held."""

    def __init__(self, message: str):
        line = " ".join(message.split())
        if len(line) > MAX_ERROR_CHARS:
            line = line[:MAX_ERROR_CHARS - 1] + "…"
        super().__init__(line)


def _location_text(value: Any) -> Any:
    """An ``out`` given as a ``Path`` (by code, not by the file), as its canonical text:
    ``Path("s3://b/x")`` has already become ``s3:/b/x``, which ``storage`` reads back."""
    return str(files.location(value)) if isinstance(value, os.PathLike) else value


class ToyActionsConfig(BaseModel):
    """The offline downstream set the demo trains on (``training/toy_actions.py``): real
    encoded videos of moving shapes in both the SSv2 and the list layout."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    # a str, not a Path: a Path collapses s3://bucket/x to s3:/bucket/x
    out: str = "data/toy_actions"
    _out_text = field_validator("out", mode="before")(classmethod(
        lambda cls, value: _location_text(value)))
    clips_per_class: int = Field(8, ge=2)
    val_per_class: int = Field(2, ge=1)
    size: int = Field(64, ge=16)       # pixels
    frames: int = Field(24, ge=4)
    seed: int = Field(0, ge=0)

    def root(self, data_format: str) -> str:
        """Where the set's ``ssv2`` or ``list`` layout is written (a path or a URL)."""
        return str(files.join(self.out, "set", "ssv2" if data_format == "ssv2" else "list"))


# What an action-set clip looks like unless the file says otherwise: one actor in the
# held-out domain, big enough to read its motion at 64 px.
ACTION_SCENE = {"recipe": "humanoid", "resolution": 64, "frames": 16, "fps": 12, "spp": 8,
                "min_objects": 1, "max_objects": 2, "min_actors": 1, "max_actors": 1,
                "domain": "heldout"}


class HumanoidActionsConfig(BaseModel):
    """A downstream action-recognition set rendered from the ``humanoid`` recipe
    (``flows/actions.py``): each clip is one actor playing one motion, the motion is its
    label, written as encoded videos in the SSv2 and list layouts, as real data is."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    out: str = Field("data/humanoid_actions", description="where the set and its "
                      "renders (render/<action>/, one shard dataset per class) are written: "
                      "a directory or an s3:// / gs:// prefix")
    _out_text = field_validator("out", mode="before")(classmethod(
        lambda cls, value: _location_text(value)))
    actions: list[str] = Field(["walk", "run", "jump", "kick", "punch", "dance_a"],
                               min_length=2, description="the classes: motions of "
                               "generation/dataset/actor_format.ACTION_NAMES")
    train_per_class: int = Field(12, ge=1, le=100_000)
    validation_per_class: int = Field(20, ge=1, le=100_000)
    test_per_class: int = Field(20, ge=0, le=100_000)
    seed: int = Field(0, ge=0, le=2**31 // 32, description="class c renders from dataset "
                      "seed seed*32 + its index in action_names")
    workers: int = Field(1, gt=0, le=256, description="shards rendered at once")
    scenes_per_shard: int = Field(8, gt=0)
    scene: SceneConfig = Field(default_factory=lambda: SceneConfig(**ACTION_SCENE),
                               description="the clips' scene, over ACTION_SCENE's defaults")

    @field_validator("scene", mode="before")
    @classmethod
    def _scene_defaults(cls, value: Any) -> Any:
        return {**ACTION_SCENE, **value} if isinstance(value, dict) else value

    @model_validator(mode="after")
    def _check(self) -> "HumanoidActionsConfig":
        unknown = sorted(set(self.actions) - set(ACTION_NAMES))
        if unknown:
            raise ValueError(f"actions: unknown {unknown} (known: {list(ACTION_NAMES)})")
        if len(set(self.actions)) != len(self.actions):
            raise ValueError("actions: each motion may be named once")
        scene = self.scene
        if scene.recipe != "humanoid" or scene.min_actors != 1 or scene.max_actors != 1 \
                or scene.actions is not None:
            raise ValueError("scene: an action set's clips are humanoid scenes with one actor "
                             "(recipe: humanoid, min_actors = max_actors = 1, no scene.actions: "
                             "the classes come from `actions`)")
        return self

    @property
    def clips_per_class(self) -> int:
        return self.train_per_class + self.validation_per_class + self.test_per_class

    def root(self, data_format: str) -> str:
        """Where the set's ``ssv2`` or ``list`` layout is written (a path or a URL)."""
        return str(files.join(self.out, "set", "ssv2" if data_format == "ssv2" else "list"))

    def generation(self, action: str) -> GenerationConfig:
        """The shard dataset of one class: its clips, its own seed, the stage's renders
        (``overwrite``: the stage owns them, a new renderer re-renders them)."""
        return GenerationConfig(
            out=str(files.join(self.out, "render", action)), scenes=self.clips_per_class,
            scenes_per_shard=self.scenes_per_shard, workers=self.workers, overwrite=True,
            seed=self.seed * 32 + ACTION_NAMES.index(action),
            scene=self.scene.model_copy(update={"actions": [action]}))


class ExperimentConfig(BaseModel):
    """All stages. ``generation`` has usable defaults; a training section that the file
    leaves out is None, and the command that needs it says so (see ``require``)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    toy_actions: Optional[ToyActionsConfig] = None
    humanoid_actions: Optional[HumanoidActionsConfig] = None
    pretrain: Optional[PretrainConfig] = None
    finetune: Optional[FinetuneConfig] = None
    evaluate: Optional[EvaluateConfig] = None

    @model_validator(mode="before")
    @classmethod
    def _downstream_from_action_set(cls, data: Any) -> Any:
        """With a ``toy_actions`` or ``humanoid_actions`` section, fine-tuning and
        evaluation read that set unless the file names another ``data_root``."""
        if not isinstance(data, dict):
            return data
        sets = [name for name in ("toy_actions", "humanoid_actions")
                if isinstance(data.get(name), dict)]
        if len(sets) > 1:
            raise ValueError("toy_actions and humanoid_actions: choose one downstream set")
        if not sets:
            return data
        kind = ToyActionsConfig if sets[0] == "toy_actions" else HumanoidActionsConfig
        made = kind.model_validate(data[sets[0]])
        data = dict(data)
        for section in ("finetune", "evaluate"):
            if isinstance(data.get(section), dict) and not data[section].get("data_root"):
                fmt = data[section].get("data_format", "list")
                data[section] = {**data[section], "data_root": str(made.root(fmt))}
        return data

    def require(self, section: str):
        value = getattr(self, section)
        if value is None:
            raise ConfigError(f"the experiment file has no `{section}` section")
        return value


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    node = data
    *parents, leaf = dotted.split(".")
    for i, part in enumerate(parents):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            where = ".".join(parents[:i + 1])
            raise ConfigError(f"--set {dotted}: {where} is a value, not a section")
        node = child
    node[leaf] = value


def parse_set(items: list[str] | None) -> list[tuple[str, Any]]:
    """``--set key=value`` items as (dotted key, value) pairs, in order.

    The value is read as YAML, as it would be in the file: ``null`` is None, ``[a, b]``
    a list, ``1e-4`` a string that the field's type then validates. The key is checked
    against the schema later, with the rest of the file, so an unknown key reads
    exactly like an unknown key in the file."""
    pairs = []
    for item in items or []:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {key}: value is not valid YAML "
                              f"({str(exc).splitlines()[0]})") from None
        pairs.append((key, value))
    return pairs


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "config"
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        msg = "unknown key"
    # a validator's own message already says what is wrong; pydantic's prefix adds nothing
    msg = msg.removeprefix("Value error, ")
    extra = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"{where}: {msg}{extra}"


def load_experiment(path: Path | str | None, overrides: dict[str, Any] | None = None,
                    sets: list[str] | None = None) -> ExperimentConfig:
    """Read and validate an experiment file; raises ``ConfigError`` with one line.

    ``overrides`` are the commands' own flags (None = not given); ``sets`` are
    ``--set key=value`` items, applied last, so ``--set finetune.init=null`` can also
    clear a value (a flag cannot)."""
    data: dict = {}
    if path is not None:
        data = _read_file(Path(path))
    for dotted, value in (overrides or {}).items():
        if value is not None:
            _set_dotted(data, dotted, value)
    for dotted, value in parse_set(sets):
        _set_dotted(data, dotted, value)
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{path or 'config'}: {_first_error(exc)}") from None
    except ValueError as exc:  # raised inside validators (e.g. unreadable asset manifest)
        raise ConfigError(f"{path or 'config'}: {exc}") from None


def _read_file(path: Path) -> dict:
    """The experiment file as a dict of sections; ``ConfigError`` for anything else (a
    missing, empty, huge, binary or non-mapping file, or bad YAML)."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read ({exc.strerror})") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: more than {MAX_CONFIG_BYTES >> 20} MiB, not an "
                          "experiment file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply") from None
    if data is None:
        # an empty file used to run on every default (a whole pipeline into ./data)
        raise ConfigError(f"{path}: the experiment file is empty")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of stage sections")
    return data


def dump_experiment(cfg: ExperimentConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
