"""Weight converters: one pure function per transition, each tested on tiny models.

- ``image_to_video``: a timm image ViT state dict -> this video model. The 2D patch
  kernel is inflated over time (divided by the tubelet length, so a static clip embeds
  exactly like the image), the class token's position embedding is folded into the
  class token, and the patch position table is resampled to the video grid.
- ``pretrain_to_finetune``: a pretrain checkpoint's weights -> a fine-tuning model:
  the classifier is new (the pretrain stage had none), the task heads and prompts are
  kept (the joint recipe keeps the synthetic losses on), position tables are resampled
  if the clip shape changed.
- ``export_inference``: training model -> the inference ``VideoViT`` without heads.

Converters never guess a checkpoint's origin from its keys: the caller picks one.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed

from training.video_vit import VideoViT


class CheckpointMismatch(ValueError):
    """Weights that do not fit the model (another size or variant)."""


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a torch file (``weights_only=True``); the
    ``state_dict``/``model`` wrappers of timm and our checkpoints are unwrapped."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            return load_file(str(path))
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - corrupt, truncated, or pickled objects
        raise CheckpointMismatch(
            f"{path}: not readable as weights ({type(exc).__name__})") from None
    for key in ("state_dict", "model", "state_dict_ema"):
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
                         model: VideoViT) -> dict[str, torch.Tensor]:
    """Pretrain weights -> ``model`` (same size and variant; clip shape may differ)."""
    out = {k: v.clone() for k, v in model.state_dict().items()}
    src = {k: v for k, v in state_dict.items() if not k.startswith("head.")}
    if "pos_embed_spatial" in src:
        src["pos_embed_spatial"] = _resample_spatial(src["pos_embed_spatial"], model.grid_size[1:])
    if "pos_embed_temporal" in src:
        src["pos_embed_temporal"] = _resample_temporal(src["pos_embed_temporal"],
                                                       model.grid_size[0])
    last_pose = "task_heads.pose.mlp.fc2.weight"
    if last_pose in src and last_pose in out and src[last_pose].shape != out[last_pose].shape:
        # the pose head's output is per frame: a new clip length needs a new last layer
        for k in (last_pose, "task_heads.pose.mlp.fc2.bias"):
            src.pop(k, None)
    out.update(src)
    _check_shapes(out, model, "pretrain checkpoint")
    return out


def export_inference(model: VideoViT) -> VideoViT:
    """The deployable model: backbone + prompts + classifier, no task heads. Returns a
    plain ``VideoViT`` (new module; ``model`` is untouched) in eval mode."""
    grid_t = model.grid_size[0]
    tubelet = model.patch_embed.proj.kernel_size[0]
    patch = model.patch_embed.proj.kernel_size[1]
    first = model.blocks[0]
    inference = VideoViT(
        img_size=model.grid_size[1] * patch, patch_size=patch, num_frames=grid_t * tubelet,
        tubelet_size=tubelet, in_chans=model.patch_embed.proj.in_channels,
        num_classes=model.num_classes, embed_dim=model.embed_dim, depth=len(model.blocks),
        num_heads=first.attn.num_heads, mlp_ratio=first.mlp.fc1.out_features / model.embed_dim,
        qkv_bias=first.attn.qkv.bias is not None, num_prompts=model.num_prompts)
    kept = {k: v for k, v in model.state_dict().items() if not k.startswith("task_heads.")}
    inference.load_state_dict(kept, strict=True)
    return inference.eval()
