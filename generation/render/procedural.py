"""Procedural materials and HDRI worlds as scene data (no bpy): what a recipe draws
from its rng. ``procedural_blender`` turns them into Blender shader nodes and world
settings inside the render worker.

A ``ProceduralMaterial`` is a Kubric material (a traitlets asset, like
``PrincipledBSDFMaterial``): one of Blender's texture nodes mixes two colours into a
Principled BSDF's base colour, on the object's generated coordinates (its bounding box
as 0..1), so a pattern is as fine on a small object as on a large one and moves with it.
No image files, unlimited variety, a pure function of the rng.
"""

from __future__ import annotations

from dataclasses import dataclass

import kubric as kb
import numpy as np
import traitlets as tl
from kubric.core import traits as ktl

# Blender texture node -> the output that mixes the two colours.
PATTERNS = {"noise": "Fac", "voronoi": "Distance", "wave": "Fac", "checker": "Fac",
            "brick": "Fac", "magic": "Fac"}

# Blender's eight CC0 studio-light worlds (bpy/4.5/datafiles/studiolights/world, by Greg
# Zaal for Poly Haven; license.txt there), found by name inside the worker.
HDRI_NAMES = ("city", "courtyard", "forest", "interior", "night", "studio", "sunrise",
              "sunset")


class ProceduralMaterial(kb.Material):
    """Two colours mixed by a procedural texture, into a Principled BSDF."""
    pattern = tl.Unicode("noise")
    color_a = ktl.RGBA(default_value=kb.get_color("white"))
    color_b = ktl.RGBA(default_value=kb.get_color("black"))
    scale = tl.Float(5.0)          # texture frequency across the object's bounding box
    distortion = tl.Float(0.0)
    roughness = tl.Float(0.5)
    metallic = tl.Float(0.0)


def random_procedural_material(rng: np.random.RandomState, name: str,
                               scale_range: tuple[float, float] = (2.0, 12.0)
                               ) -> ProceduralMaterial:
    """A random pattern, two random-hue colours of different value, a random finish."""
    pattern = sorted(PATTERNS)[rng.randint(len(PATTERNS))]
    color_a = kb.random_hue_color(rng=rng)
    color_b = kb.Color.from_hsv(rng.uniform(), rng.uniform(0.2, 1.0), rng.uniform(0.1, 0.6))
    metal = rng.uniform() < 0.3
    return ProceduralMaterial(name=f"{name}_{pattern}", pattern=pattern, color_a=color_a,
                              color_b=color_b, scale=rng.uniform(*scale_range),
                              distortion=rng.uniform(0.0, 3.0),
                              roughness=rng.uniform(0.2, 0.5) if metal else rng.uniform(0.5, 0.9),
                              metallic=1.0 if metal else 0.0)


@dataclass(frozen=True)
class HdriWorld:
    """Light and background from one of Blender's HDRIs: ``rotation_z`` (radians) about
    the vertical, ``strength`` scales both the light and what the camera sees."""
    name: str
    rotation_z: float
    strength: float


def random_hdri_world(rng: np.random.RandomState,
                      strength_range: tuple[float, float] = (0.6, 1.5)) -> HdriWorld:
    return HdriWorld(name=HDRI_NAMES[rng.randint(len(HDRI_NAMES))],
                     rotation_z=float(rng.uniform(0.0, 2.0 * np.pi)),
                     strength=float(rng.uniform(*strength_range)))
