"""Weight converters: one pure function per transition, each tested on tiny models.

- ``image_to_video``: a timm image ViT state dict -> this video model. The 2D patch
  kernel is inflated over time (divided by the tubelet length, so a static clip embeds
  exactly like the image), the class token's position embedding is folded into the
  class token, and the patch position table is resampled to the video grid.
- ``pretrain_to_finetune``: a pretrain checkpoint's weights -> a fine-tuning model:
  the classifier is new (the pretrain stage had none), the task heads and prompts are
  kept (the joint recipe keeps the synthetic losses on), position tables are resampled
  if the clip shape changed.
- ``from_torchvision_mvit``: torchvision's ``mvit_v2_s`` state dict (its Kinetics-400
  ``.pth``) -> the ``mvit`` family: the same names, prompts and heads added.
- ``from_videomae``: the VideoMAE repository's ``.pth`` (fine-tuned, or the pretrained
  ``encoder.*``) -> the ``vit`` family with VideoMAE's options.
- ``from_videomae_hf``: ``transformers``' ``VideoMAEModel`` /
  ``VideoMAEForVideoClassification`` state dict -> the same.
- ``export_inference``: training model -> its family's backbone without heads.

Each source converter takes the source state dict and the target model and returns a
full state dict for it: entries the source has no counterpart for (prompts, heads, and
the classifier unless ``keep_classifier``) keep the model's initial values.
Converters never guess a checkpoint's origin from its keys: the caller picks one
(``init_format``), and a state dict that is not of that format is named as such.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from timm.layers import resample_abs_pos_embed

from training.backbones import get_family
from training.backbones.vit import VideoViT


class CheckpointMismatch(ValueError):
    """Weights that do not fit the model (another size or variant)."""


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a torch file (``weights_only=True``); the
    ``state_dict``/``model`` wrappers of timm and our checkpoints are unwrapped."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - corrupt, truncated, or pickled objects
        raise CheckpointMismatch(
            f"{path}: not readable as weights ({type(exc).__name__})") from None
    for key in ("state_dict", "model", "module", "state_dict_ema"):  # timm, ours, VideoMAE
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointMismatch(f"{path}: holds no state dict of tensors")
    return obj


def _check_shapes(out: dict[str, torch.Tensor], model: torch.nn.Module, what: str) -> None:
    target = model.state_dict()
    unknown = sorted(set(out) - set(target))
    if unknown:
        raise CheckpointMismatch(f"{what}: keys the model does not have, e.g. {unknown[:3]}")
    for k, v in out.items():
        if v.shape != target[k].shape:
            raise CheckpointMismatch(
                f"{what}: '{k}' is {tuple(v.shape)} but the model wants {tuple(target[k].shape)} "
                "(another model size?)")


def _resample_spatial(pos: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
    """``[1, h*w, D]`` (square) -> ``[1, H*W, D]``."""
    old = int(round(pos.shape[1] ** 0.5))
    if old * old != pos.shape[1]:
        raise CheckpointMismatch(f"position table of {pos.shape[1]} entries is not a square grid")
    if (old, old) == tuple(grid_hw):
        return pos
    return resample_abs_pos_embed(pos, new_size=list(grid_hw), old_size=[old, old],
                                  num_prefix_tokens=0)


def _resample_temporal(pos: torch.Tensor, steps: int) -> torch.Tensor:
    """``[1, t, D]`` -> ``[1, steps, D]`` by linear interpolation over time."""
    if pos.shape[1] == steps:
        return pos
    return F.interpolate(pos.transpose(1, 2), size=steps, mode="linear",
                         align_corners=False).transpose(1, 2)


def image_to_video(state_dict: dict[str, torch.Tensor], model: VideoViT) -> dict[str, torch.Tensor]:
    """A timm ``VisionTransformer`` state dict (class token, learned absolute positions,
    no register tokens) -> a full state dict for ``model``. Entries the image model has
    no counterpart for (temporal positions, prompts, task heads) keep ``model``'s
    initial values; the image classifier is dropped (its classes are not ours)."""
    if model.family != "vit" or model.global_pool != "token" or \
            model.pos_embed_kind != "factorized":
        raise CheckpointMismatch(f"image weights (timm ViT) fit a vit with a class token and "
                                 f"learned positions, the model is of the {model.family} "
                                 "family or a VideoMAE ViT")
    out = {k: v.clone() for k, v in model.state_dict().items()}
    src = dict(state_dict)
    for dropped in ("head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias"):
        src.pop(dropped, None)
    if "reg_token" in src or "pos_embed" not in src or "cls_token" not in src:
        raise CheckpointMismatch("image weights: expected a timm ViT with cls_token and pos_embed")

    w = src.pop("patch_embed.proj.weight")  # [D, C, p, p]
    tubelet = model.patch_embed.proj.kernel_size[0]
    # mean inflation: the sum over a static tubelet reproduces the 2D response
    out["patch_embed.proj.weight"] = w[:, :, None].repeat(1, 1, tubelet, 1, 1) / tubelet
    if "patch_embed.proj.bias" in src:
        out["patch_embed.proj.bias"] = src.pop("patch_embed.proj.bias")

    pos = src.pop("pos_embed")  # [1, 1 + h*w, D]
    # the video model has no class position: adding it to the class token is exact
    out["cls_token"] = src.pop("cls_token") + pos[:, :1]
    out["pos_embed_spatial"] = _resample_spatial(pos[:, 1:], model.grid_size[1:])
    out.update(src)  # blocks.* and norm.* share timm's names
    _check_shapes(out, model, "image weights")
    return out


def pretrain_to_finetune(state_dict: dict[str, torch.Tensor],
                         model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Pretrain weights -> ``model`` (same size and variant; clip shape may differ)."""
    out = {k: v.clone() for k, v in model.state_dict().items()}
    src = {k: v for k, v in state_dict.items() if not k.startswith("head.")}
    if "pos_embed_spatial" in src:
        src["pos_embed_spatial"] = _resample_spatial(src["pos_embed_spatial"], model.grid_size[1:])
    if "pos_embed_temporal" in src:
        src["pos_embed_temporal"] = _resample_temporal(src["pos_embed_temporal"],
                                                       model.grid_size[0])
    for k in [k for k in src if k.startswith("task_heads.") and k in out]:
        if src[k].shape != out[k].shape:
            # a task head whose output is per frame (pose, boxes): a new clip length
            # needs a new last layer, which keeps ``model``'s initialisation
            src.pop(k)
    out.update(src)
    _check_shapes(out, model, "pretrain checkpoint")
    return out


def export_inference(model: torch.nn.Module) -> torch.nn.Module:
    """The deployable model: backbone + prompts + classifier, no task heads. Returns the
    family's plain class (new module; ``model`` is untouched) in eval mode."""
    inference = get_family(model.family)(**model.backbone_kwargs)
    kept = {k: v for k, v in model.state_dict().items() if not k.startswith("task_heads.")}
    inference.load_state_dict(kept, strict=True)
    return inference.eval()


# --- checkpoints of other code bases ------------------------------------------------
CLASSIFIERS = ("head.", "classifier.")  # the source's classifier: its classes are not ours


def _expect(src: dict[str, torch.Tensor], model: torch.nn.Module, fmt: str, family: str,
            marker: str) -> None:
    """One line naming the format wanted and what the file or model is instead."""
    if model.family != family:
        raise CheckpointMismatch(f"init_format '{fmt}' holds a {family} backbone, the model "
                                 f"is of the {model.family} family")
    if marker not in src:
        raise CheckpointMismatch(f"not a {fmt} state dict (no '{marker}'; its first keys: "
                                 f"{sorted(src)[:3]})")


def _fill(src: dict[str, torch.Tensor], model: torch.nn.Module, fmt: str,
          keep_classifier: bool) -> dict[str, torch.Tensor]:
    """``model``'s state dict with ``src`` written over it; every backbone weight must
    come from ``src`` (prompts, task heads and the classifier may not)."""
    if not keep_classifier:
        src = {k: v for k, v in src.items() if not k.startswith(CLASSIFIERS)}
    out = {k: v.clone() for k, v in model.state_dict().items()}
    own = ("prompt_tokens", "task_heads.", "head.", "fc_norm.")
    missing = [k for k in out if k not in src and not k.startswith(own)]
    if missing:
        raise CheckpointMismatch(f"{fmt} weights lack {len(missing)} of the model's, e.g. "
                                 f"'{missing[0]}' (another architecture?)")
    out.update(src)
    _check_shapes(out, model, f"{fmt} weights")
    return out


def from_torchvision_mvit(state_dict: dict[str, torch.Tensor], model: torch.nn.Module,
                          keep_classifier: bool = False) -> dict[str, torch.Tensor]:
    """torchvision ``mvit_v2_s`` (e.g. ``MViT_V2_S_Weights.KINETICS400_V1``) -> ``model``
    of the ``mvit`` family, whose names are torchvision's."""
    _expect(state_dict, model, "torchvision_mvit", "mvit", "conv_proj.weight")
    return _fill(dict(state_dict), model, "torchvision_mvit", keep_classifier)


def _qkv_bias(q: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """VideoMAE's q and v biases as timm's one qkv bias (VideoMAE has no k bias)."""
    return torch.cat([q, torch.zeros_like(q), v])


def from_videomae(state_dict: dict[str, torch.Tensor], model: torch.nn.Module,
                  keep_classifier: bool = False) -> dict[str, torch.Tensor]:
    """The VideoMAE repository's ViT (``modeling_finetune``; or the pretrained model's
    ``encoder.*``, its decoder dropped) -> ``model`` of the ``vit`` family. Its names
    are timm's but for ``attn.q_bias`` / ``attn.v_bias``."""
    src = {k.removeprefix("encoder."): v for k, v in state_dict.items()
           if not k.startswith(("decoder.", "encoder_to_decoder.", "mask_token"))}
    src.pop("pos_embed", None)  # the fixed sin-cos table, rebuilt by the model
    _expect(src, model, "videomae", "vit", "patch_embed.proj.weight")
    if getattr(model, "fc_norm", None) is not None:  # mean pooling: no final token norm
        # (the pretrained encoder's last norm; VideoMAE's fine-tuning drops it too)
        src = {k: v for k, v in src.items() if not k.startswith("norm.")}
    for key in [k for k in src if k.endswith(".attn.q_bias")]:
        block = key[: -len("q_bias")]
        src[block + "qkv.bias"] = _qkv_bias(src.pop(key), src.pop(block + "v_bias"))
    return _fill(src, model, "videomae", keep_classifier)


_HF_NAMES = (  # transformers' VideoMAE names -> timm's, per encoder layer
    ("attention.output.dense.", "attn.proj."), ("intermediate.dense.", "mlp.fc1."),
    ("output.dense.", "mlp.fc2."), ("layernorm_before.", "norm1."),
    ("layernorm_after.", "norm2."))


def from_videomae_hf(state_dict: dict[str, torch.Tensor], model: torch.nn.Module,
                     keep_classifier: bool = False) -> dict[str, torch.Tensor]:
    """``transformers.VideoMAEModel`` / ``VideoMAEForVideoClassification`` -> ``model``
    of the ``vit`` family. q, k, v are separate there (biases ``query.bias`` and
    ``value.bias``, or ``q_bias`` / ``v_bias`` in older releases)."""
    src = {k.removeprefix("videomae."): v for k, v in state_dict.items()
           if not k.endswith("position_embeddings")}  # the fixed table, rebuilt by the model
    _expect(src, model, "videomae_hf", "vit", "embeddings.patch_embeddings.projection.weight")
    out: dict[str, torch.Tensor] = {}
    for key, value in src.items():
        if key.startswith("embeddings.patch_embeddings.projection."):
            out["patch_embed.proj." + key.rsplit(".", 1)[1]] = value
        elif key.startswith(("fc_norm.", "classifier.", "layernorm.")):
            head = {"fc_norm": "fc_norm", "classifier": "head", "layernorm": "norm"}
            name, leaf = key.split(".", 1)
            out[f"{head[name]}.{leaf}"] = value
        elif not key.startswith("encoder.layer."):
            out[key] = value  # unknown: named by the shape check below
    layers = sorted({int(k.split(".")[2]) for k in src if k.startswith("encoder.layer.")})
    for i in layers:
        pre, blk = f"encoder.layer.{i}.", f"blocks.{i}."
        att = pre + "attention.attention."
        out[blk + "attn.qkv.weight"] = torch.cat(
            [src[att + f"{n}.weight"] for n in ("query", "key", "value")])
        q = src.get(att + "query.bias", src.get(att + "q_bias"))
        if q is not None:
            out[blk + "attn.qkv.bias"] = _qkv_bias(q, src.get(att + "value.bias",
                                                              src.get(att + "v_bias")))
        for key, value in src.items():
            for theirs, ours in _HF_NAMES:
                if key.startswith(pre + theirs):
                    out[blk + ours + key[len(pre + theirs):]] = value
    if getattr(model, "fc_norm", None) is not None:
        out = {k: v for k, v in out.items() if not k.startswith("norm.")}
    return _fill(out, model, "videomae_hf", keep_classifier)


# init_format -> converter (``pvit`` and ``timm_image`` are handled by the trainer)
SOURCE_CONVERTERS = {"torchvision_mvit": from_torchvision_mvit, "videomae": from_videomae,
                     "videomae_hf": from_videomae_hf}
