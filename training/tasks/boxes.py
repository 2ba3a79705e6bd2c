"""2D boxes: per frame and object slot, the object's box in the clip's pixel frame;
L1 + GIoU over present slots (the paper's boxes task, weight 0.1).

Targets come from the instance segmentation masks in the shard (not the projected 3D
box): the mask is what is visible, it follows the crop and the flip exactly like every
other label map, and an object cropped out or fully occluded is simply absent. A box is
``(x0, y0, x1, y1)`` normalised to [0, 1] by the crop's side (pixel edges, so a one
pixel object has a non-zero box); an absent slot is all zeros with presence 0.
The slots are pose's (``training.tasks.pose.object_slots``): the same objects, in id
order. The head predicts raw ``(cx, cy, w, h)`` logits; ``decode_boxes`` maps them
through a sigmoid to a valid ``xyxy`` box, which GIoU requires."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.ops import box_convert, generalized_box_iou_loss

from training.heads import PoseHead, clip_frames
from training.tasks.base import ClipView, SyntheticTask
from training.tasks.pose import object_slots

BOX_FIELDS = 4  # cx, cy, w, h logits


def boxes_targets(view: ClipView) -> dict[str, torch.Tensor]:
    slots = object_slots(view.clip, view.pose_slots)
    ids = torch.as_tensor(view.clip["instances"]["id"][slots].astype("int64"))
    seg = view.crop("instance_seg").long()  # [T, s, s], already cropped and flipped
    t, side = seg.shape[0], seg.shape[-1]
    boxes = torch.zeros(t, view.pose_slots, 4)
    presence = torch.zeros(t, view.pose_slots)
    if len(slots):
        masks = seg[:, None] == ids[None, :, None, None]  # [T, n, s, s]
        cols, rows = masks.any(2), masks.any(3)  # [T, n, s] each
        present = cols.any(-1)
        index = torch.arange(side)
        # first and one-past-last occupied pixel; absent rows are zeroed below
        x0 = torch.where(cols, index, side).amin(-1)
        x1 = torch.where(cols, index + 1, 0).amax(-1)
        y0 = torch.where(rows, index, side).amin(-1)
        y1 = torch.where(rows, index + 1, 0).amax(-1)
        box = torch.stack([x0, y0, x1, y1], -1).float() / side
        boxes[:, :len(slots)] = box * present[..., None]
        presence[:, :len(slots)] = present.float()
    return {"boxes": boxes, "boxes_presence": presence}


def decode_boxes(raw: torch.Tensor) -> torch.Tensor:
    """Head output ``[..., 4]`` (cx, cy, w, h logits) -> ``xyxy`` in [0, 1], x1 >= x0."""
    return box_convert(raw.float().sigmoid(), "cxcywh", "xyxy")


def boxes_loss(pred: torch.Tensor, boxes: torch.Tensor, presence: torch.Tensor) -> torch.Tensor:
    """Mean L1 (per coordinate) + mean GIoU loss over present slots. ``pred`` is the raw
    ``[S,T,K,4]`` head output; no present slot gives a zero that keeps the graph."""
    present = presence > 0.5
    if not present.any():
        return pred.sum() * 0.0
    p, t = decode_boxes(pred)[present], boxes[present].float()
    return F.l1_loss(p, t) + generalized_box_iou_loss(p, t, reduction="mean")


TASK = SyntheticTask(
    name="boxes", weight=0.1, fields=("instance_seg", "instances"),
    target_keys=("boxes", "boxes_presence"), targets=boxes_targets,
    # not in the default task list: configs and checkpoints written before it stay valid
    default=False,
    build_head=lambda ctx: PoseHead(ctx.width, clip_frames(ctx.taps[0]), ctx.pose_slots,
                                    drop=ctx.drop, fields=BOX_FIELDS),
    loss=lambda pred, t: boxes_loss(pred, t["boxes"], t["boxes_presence"]))
