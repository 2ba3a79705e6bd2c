"""Scene recipes: plain functions ``build(scene, cfg, rng, assets, asset_ids) -> SceneContent``.

A recipe adds a floor, objects, lights and a camera to an empty ``kubric.Scene``
(views such as the renderer are already linked, so keyframes reach them) and runs
the physics. It never imports ``bpy``: the renderer is a view on the scene. Add a
recipe by writing a module with such a function and registering it here.

The registry names ``module:function`` and is resolved only inside render workers:
``import kubric`` pulls in TensorFlow, which must stay out of the CLI/training
process (TensorFlow loaded before torch's triton crashes the process).
"""

from importlib import import_module

RECIPES = {"movi": "generation.render.recipes.movi:build",
           "humanoid": "generation.render.recipes.humanoid:build",
           "movi_c": "generation.render.recipes.movi_c:build",
           "movi_e": "generation.render.recipes.movi_e:build",
           "movi_f": "generation.render.recipes.movi_f:build"}

# The asset set (generation.render.object_assets.ASSET_SETS) a recipe renders when the
# config names none; every other recipe renders the shapes.
RECIPE_ASSET_SET = {"movi_c": "objects", "movi_e": "objects", "movi_f": "objects"}

# Recipes whose scenes have people (this one module: generation.dataset.actor_format)
from generation.dataset.actor_format import ACTOR_RECIPES  # noqa: E402,F401


def get_recipe(name: str):
    module, _, function = RECIPES[name].partition(":")
    return getattr(import_module(module), function)
