"""The names and shapes of the actor labels (recipes with people: ``humanoid``).

The lists here are part of the format: ``actor_action`` indexes ``ACTION_NAMES``, the
J axis of ``actor_joints_*`` follows ``JOINT_NAMES``, and the body-part classes of
``semantic_seg`` are ``ACTOR_CLASSES`` appended to the dataset's class list. The
manifest records them as ``action_names``, ``joint_names`` and ``classes``, so a reader
takes them from there (docs/dataset-format.md, "Actors").
"""

from __future__ import annotations

# DeepMimic's 15 motion-capture clips (pybullet_data/data/motions/humanoid3d_<name>.txt).
ACTION_NAMES = ("walk", "run", "jump", "kick", "punch", "spin", "spinkick", "backflip",
                "cartwheel", "crawl", "roll", "dance_a", "dance_b", "getup_facedown",
                "getup_faceup")

# The origin of each link of DeepMimic's humanoid, in pybullet's link order (root = the
# pelvis), then the points the skeleton lacks: the top of the head and the toe tips.
JOINT_NAMES = ("pelvis", "chest", "neck", "right_hip", "right_knee", "right_ankle",
               "right_shoulder", "right_elbow", "right_wrist", "left_hip", "left_knee",
               "left_ankle", "left_shoulder", "left_elbow", "left_wrist", "head_top",
               "right_toe", "left_toe")

# "person" is an actor's instance category (its box, its instance id); the body parts
# are what semantic_seg shows on its pixels.
BODY_PARTS = ("head", "torso", "left_upper_arm", "right_upper_arm", "left_lower_arm",
              "right_lower_arm", "left_hand", "right_hand", "left_upper_leg",
              "right_upper_leg", "left_lower_leg", "right_lower_leg", "left_foot",
              "right_foot")
PERSON = "person"
ACTOR_CLASSES = (PERSON,) + BODY_PARTS

# Recipes whose scenes have people (generation.render.recipes.humanoid); the richer
# recipes (movi_c, movi_e, movi_f) have them when their spec asks for actors
# (``max_actors`` > 0). Their datasets' classes add "person" and the body parts, their
# clips the actor_* fields. The spec is the fields' switch (shard_format.SPEC_SWITCHES).
ACTOR_RECIPES = frozenset({"humanoid"})
ACTOR_SWITCH = "max_actors"


def writes_actors(spec: dict) -> bool:
    """Whether a spec writes the actor fields: a recipe with people, or one asked for
    actors (a spec that says neither is the default, movi: none)."""
    return spec.get("recipe") in ACTOR_RECIPES or (spec.get(ACTOR_SWITCH) or 0) > 0


# Bounds of a clip's actor arrays for the reader's memory budget (shard_format.clip_limit).
MAX_ACTORS = 16
MAX_JOINTS = 64

# clip key -> shape (A actors, T frames, J joints), as shard_format.SHAPES writes them.
ACTOR_SHAPES = {
    "actor_ids": ("A",), "actor_action": ("A",), "actor_mirrored": ("A",),
    "actor_joints_3d": ("A", "T", "J", 3), "actor_joints_2d": ("A", "T", "J", 2),
    "actor_joints_visible": ("A", "T", "J"),
}


def check_actor_shapes(clip: dict, frames: int) -> str | None:
    """What is wrong with a decoded clip's actor arrays (all or none, one A, one J, its
    T frames), or None."""
    present = [k for k in ACTOR_SHAPES if clip.get(k) is not None]
    if not present:
        return None
    if len(present) != len(ACTOR_SHAPES):
        missing = sorted(set(ACTOR_SHAPES) - set(present))
        return f"actor labels without {', '.join(missing)}"
    dims = {"A": clip["actor_ids"].shape[0], "T": frames, "J": clip["actor_joints_3d"].shape[2]}
    for key, shape in ACTOR_SHAPES.items():
        expected = tuple(dims.get(d, d) for d in shape)
        if clip[key].shape != expected:
            return f"{key}: shape {clip[key].shape} != {expected}"
    return None
