"""Scene recipes: plain functions ``build(scene, cfg, rng, assets) -> SceneContent``.

A recipe adds a floor, objects, lights and a camera to an empty ``kubric.Scene``
(views such as the renderer are already linked, so keyframes reach them) and runs
the physics. It never imports ``bpy``: the renderer is a view on the scene. Add a
recipe by writing a module with such a function and registering it here.
"""

from generation.recipes import movi

RECIPES = {"movi": movi.build}
