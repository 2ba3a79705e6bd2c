"""Kubric's Blender renderer on Blender 4.5 (pip ``bpy``), fixed.

Kubric (kubric-nightly 2023.12.27) was written for Blender 2.93. Its scene API and
PyBullet simulation work unchanged on bpy 4.5; its renderer breaks in the places
below. ``Blender45`` subclasses Kubric's ``Blender`` view and fixes each one, so the
rest of Kubric (scene observers, keyframing, the Z/Normal/Cryptomatte/Vector passes
of the auxiliary view layer) is used as it is; the Vector and UV passes can be turned
off (``flow=False``, ``uv=False``) when nobody reads them.

Blender 4.x change -> symptom in Kubric -> fix here:

- Principled BSDF inputs renamed (``Specular`` -> ``Specular IOR Level``,
  ``Transmission`` -> ``Transmission Weight``, ``Emission`` -> ``Emission Color``);
  ``Specular Tint`` is a colour; ``Transmission Roughness`` removed -> KeyError for
  every object with a ``PrincipledBSDFMaterial`` -> ``_add_principled_material`` binds
  Kubric's traits to the new sockets; ``specular_tint`` (a float) becomes a colour
  between white and the base colour.
- AOV output node ``name`` -> ``aov_name`` -> object coordinates silently all 0 ->
  ``_fix_object_coordinates_aov``.
- ``import_scene.obj`` -> ``wm.obj_import``; ``Mesh.use_auto_smooth`` removed (4.1) ->
  .obj assets fail to load -> ``_add_file_object``.
- cryptomatte EXR channels lowercase on 4.5 (``CryptoObject00.r``) -> KeyError
  ``CryptoObject00.R`` in post-processing -> ``read_exr_layers`` matches channel names
  case-insensitively.
- compositor vector sockets are 4-wide and become a colour as ``(x, y, z, 1)``: Kubric's
  separate/combine RGBA pair on the Vector pass (a 2.9x alpha fix) writes ``Vector.A`` =
  1.0 in place of the next-frame y motion -> ``forward_flow``'s first channel 1.0 at
  every pixel -> ``_link_vector_pass`` links the pass straight to the file output
  (``Vector.X/Y/Z/W``), and ``read_exr_layers`` turns it into (dx, dy) flows in OpenCV
  image axes.
- default view transform AgX -> colours differ from Kubric datasets ->
  ``view_transform="Filmic"``.
- NLM denoiser removed -> denoising setting ignored -> OpenImageDenoise, set explicitly.

And one change for speed, not for 4.x: Kubric resets Blender for every scene with
``read_factory_settings``, which also resets the preferences and re-registers every
add-on (38-53 ms of a ~140 ms scene build at 128 px). ``Blender45`` does that once per
process and then loads only the factory startup data (``read_homefile``, ~7 ms): the same
empty scene, and the same bytes (``tests/generation/render/test_render_labels.py``, the worker
test, renders its scene second).

Each fix has a test in ``tests/generation/render/test_kubric_compat.py`` that checks the
label it affects. Bpy 5.0 replaced the compositor node-tree API: stay on 4.5 LTS.
"""

from __future__ import annotations

import contextlib
import io
import logging
import sys
import time
from pathlib import Path
from typing import Sequence

import bpy  # noqa: F401  (import order: bpy before kubric's renderer)
import cv2
import numpy as np
import OpenEXR
from kubric import core
from kubric.redirect_io import RedirectStream
from kubric.renderer import blender_utils
from kubric.renderer.blender import (
    AttributeSetter,
    Blender,
    KeyframeSetter,
    register_object3d_setters,
)
from singledispatchmethod import singledispatchmethod

from generation.render import procedural_blender
from generation.render.procedural import ProceduralMaterial

logger = logging.getLogger(__name__)

OBJECT_COORDINATES_AOV = "ObjectCoordinates"
# Kubric's pre-4.0 OBJ importer arguments -> wm.obj_import's.
_AXIS = {"X": "X", "Y": "Y", "Z": "Z", "-X": "NEGATIVE_X", "-Y": "NEGATIVE_Y",
         "-Z": "NEGATIVE_Z"}


class Blender45(Blender):
    """Kubric's Blender view with the Blender 4.5 fixes applied (see module docstring).

    Extra arguments: ``view_transform`` (default "Filmic", Kubric's look),
    ``denoiser`` ("OPENIMAGEDENOISE" is the only CPU denoiser left in 4.x),
    ``one_call`` (render every frame in one animation render call), ``flow`` /
    ``uv`` / ``object_coordinates`` (the auxiliary layer's Vector, UV and object
    coordinate passes) and ``linear_image`` (the EXR's float copy of the image, which
    nobody reads: RGB comes from the PNG) all on by default, as in Kubric; and
    ``compress_scratch`` (Kubric's ZIP-compressed EXR and level-15 PNG; off, both are
    written uncompressed: the same pixels, and the files live only until they are read
    back).
    """

    def __init__(self, scene: core.Scene, *, view_transform: str = "Filmic",
                 denoiser: str = "OPENIMAGEDENOISE", one_call: bool = False,
                 flow: bool = True, uv: bool = True, object_coordinates: bool = True,
                 linear_image: bool = True, compress_scratch: bool = True, **kwargs):
        if not flow and kwargs.get("motion_blur") is not None:
            raise ValueError("motion_blur needs the Vector pass: pass flow=True")
        super().__init__(scene, **kwargs)
        self._drop_aux_passes(flow=flow, uv=uv)
        out_node = self.exr_output_node
        for slot, keep in (("ObjectCoordinates", object_coordinates), ("Image", linear_image)):
            if not keep:    # the pass is still rendered (the AOV), just not written
                out_node.file_slots.remove(out_node.inputs[slot])
        if not compress_scratch:
            # A pass file is written once and read once, from the page cache: compressing
            # it cost more than the bytes saved (128 px: -0.007 s/frame, same arrays).
            out_node.format.exr_codec = "NONE"
            self.blender_scene.render.image_settings.compression = 0
        # One animation render call for all frames instead of Kubric's call per frame
        # (same bytes, less per-call work). Cycles' persistent data was tried too: it
        # crashed Blender 4.5 (malloc: invalid size) on a render after a scene reset.
        self.one_call = one_call
        self._fix_object_coordinates_aov()
        self.blender_scene.view_settings.view_transform = view_transform
        self.blender_scene.view_settings.look = "None"
        if self.use_denoising:
            self.blender_scene.cycles.denoiser = denoiser
        # Our EXR reader understands both channel spellings; keep Kubric's table of
        # post-processors and add float normals (Kubric's "normal" is quantised to uint16).
        self.post_processors["normal_float"] = lambda layers, scene: layers["normal"]

    def _drop_aux_passes(self, *, flow: bool, uv: bool) -> None:
        """Kubric always turns on the Vector and UV passes of the auxiliary layer. The
        Vector pass makes Cycles sync every object's motion at the neighbouring frames
        on each frame; without it (and UV) the EXR just lacks those channels, which
        ``read_exr_layers`` allows. The compositor's file slots for a dropped pass are
        removed with their links (a disabled pass has no socket to link from)."""
        aux = self.blender_scene.view_layers["AuxOutputs"]
        aux.use_pass_vector = flow
        aux.use_pass_uv = uv
        tree, out_node = self.blender_scene.node_tree, self.exr_output_node
        if not flow:
            # Kubric routes Vector through a separate/combine RGBA pair (alpha fix)
            combine = out_node.inputs["Vector"].links[0].from_node
            tree.nodes.remove(combine.inputs["R"].links[0].from_node)
            tree.nodes.remove(combine)
            out_node.file_slots.remove(out_node.inputs["Vector"])
        else:
            self._link_vector_pass()
        if not uv:
            out_node.file_slots.remove(out_node.inputs["UV"])

    # -- fix: the Vector pass's fourth channel ------------------------------------------
    def _link_vector_pass(self) -> None:
        """Kubric sends the Vector pass through a separate/combine RGBA pair (a Blender
        2.9x workaround for the pass's alpha, blender.stackexchange.com/q/175621). On 4.x
        the compositor turns the 4-wide vector into a colour as (x, y, z, 1.0) before
        the pair, so the EXR's ``Vector.A`` is 1.0 everywhere instead of the next-frame
        y motion. Linked straight to the file output, the pass is written whole as
        ``Vector.X/Y/Z/W`` (X, Y, Z unchanged)."""
        tree, out_node = self.blender_scene.node_tree, self.exr_output_node
        combine = out_node.inputs["Vector"].links[0].from_node
        split = combine.inputs["R"].links[0].from_node
        vector = split.inputs["Image"].links[0].from_socket
        tree.nodes.remove(split)
        tree.nodes.remove(combine)
        tree.links.new(vector, out_node.inputs["Vector"])

    # -- speed: reset the scene, not the preferences and add-ons ----------------------
    _preferences_reset = False

    @staticmethod
    def clear_and_reset_blender_scene(verbose: bool = False, custom_scene: str | None = None):
        """Kubric's reset (an empty scene with a new world, or ``custom_scene``), with the
        preferences and add-ons reset only on the process's first scene: nothing this
        project renders reads a preference that a scene changes (the Cycles device is set
        per scene by ``generation.render.devices.use_device``)."""
        if not Blender45._preferences_reset:
            Blender.clear_and_reset_blender_scene(verbose, custom_scene=custom_scene)
            Blender45._preferences_reset = True
            return
        # Kubric's reset with read_homefile in place of read_factory_settings
        with RedirectStream(stream=sys.stdout, disabled=verbose):
            bpy.ops.wm.read_homefile(use_empty=True, use_factory_startup=True)
            if custom_scene is None:
                bpy.context.scene.world = bpy.data.worlds.new("World")
            else:
                logger.info("Loading scene from '%s'", custom_scene)
                bpy.ops.wm.open_mainfile(filepath=custom_scene)

    # -- fix: AOV node property renamed --------------------------------------------
    @staticmethod
    def _fix_object_coordinates_aov() -> None:
        """Kubric sets ``ShaderNodeOutputAOV.name``; since 2.9x the pass it writes is
        chosen by ``aov_name``, so the AOV pass stayed empty (all zeros)."""
        for mat in bpy.data.materials:
            if not mat.use_nodes:
                continue
            for node in mat.node_tree.nodes:
                if node.bl_idname == "ShaderNodeOutputAOV" and not node.aov_name:
                    node.aov_name = OBJECT_COORDINATES_AOV

    # -- dispatch: our handlers first, Kubric's for everything else ---------------------
    @singledispatchmethod
    def add_asset(self, asset: core.Asset):
        return super().add_asset(asset)

    # -- fix: Principled BSDF sockets renamed ----------------------------------------------
    @add_asset.register(core.PrincipledBSDFMaterial)
    @blender_utils.prepare_blender_object
    def _add_principled_material(self, obj: core.PrincipledBSDFMaterial):
        mat = bpy.data.materials.new(obj.uid)
        mat.use_nodes = True
        bsdf = mat.node_tree.nodes["Principled BSDF"]
        # Kubric's emission is a colour at strength 1 (2.93 had no strength socket).
        bsdf.inputs["Emission Strength"].default_value = 1.0
        _bind(obj, "color", bsdf.inputs["Base Color"])
        _bind(obj, "roughness", bsdf.inputs["Roughness"])
        _bind(obj, "metallic", bsdf.inputs["Metallic"])
        _bind(obj, "specular", bsdf.inputs["Specular IOR Level"])
        _bind(obj, "ior", bsdf.inputs["IOR"])
        _bind(obj, "transmission", bsdf.inputs["Transmission Weight"])
        _bind(obj, "emission", bsdf.inputs["Emission Color"])

        # 2.93's scalar tint mixed the specular colour from white towards the base
        # colour; 4.x takes that colour directly.
        def tint_colour(tint: float):
            base = np.asarray(obj.color.rgba if hasattr(obj.color, "rgba") else obj.color)
            return tuple((1.0 - tint) * np.ones(4) + tint * base)

        _bind(obj, "specular_tint", bsdf.inputs["Specular Tint"], converter=tint_colour)
        if obj.transmission_roughness:
            logger.debug("transmission_roughness has no socket in Blender 4.x; ignored")
        return mat

    # -- procedural materials (generation.render.procedural) -----------------------------
    @add_asset.register(ProceduralMaterial)
    @blender_utils.prepare_blender_object
    def _add_procedural_material(self, obj: ProceduralMaterial):
        return procedural_blender.build_material(
            obj, lambda trait, socket: _bind(obj, trait, socket))

    # -- fix: OBJ importer renamed; Mesh.use_auto_smooth removed ---------------------------
    @add_asset.register(core.FileBasedObject)
    @blender_utils.prepare_blender_object
    def _add_file_object(self, obj: core.FileBasedObject):
        if obj.render_filename is None:
            return None
        path = Path(obj.render_filename)
        if path.suffix.lower() != ".obj":
            raise ValueError(f"render mesh {path.name}: only .obj assets are supported "
                             "on Blender 4.5")
        kwargs = dict(obj.render_import_kwargs)
        # Accept Kubric's (2.93) argument names as well as 4.x's.
        if "axis_forward" in kwargs:
            kwargs["forward_axis"] = _AXIS[kwargs.pop("axis_forward")]
        if "axis_up" in kwargs:
            kwargs["up_axis"] = _AXIS[kwargs.pop("axis_up")]
        for old in [k for k in kwargs if k not in ("forward_axis", "up_axis", "global_scale")]:
            kwargs.pop(old)
        bpy.ops.object.select_all(action="DESELECT")
        with contextlib.redirect_stdout(io.StringIO()):
            bpy.ops.wm.obj_import(filepath=str(path), use_split_objects=False, **kwargs)
        imported = bpy.context.selected_objects
        if len(imported) != 1:
            raise ValueError(f"{path} imported as {len(imported)} objects, expected 1")
        blender_obj = imported[0]
        register_object3d_setters(obj, blender_obj)
        obj.observe(AttributeSetter(blender_obj, "active_material",
                                    converter=self._convert_to_blender_object), "material")
        obj.observe(AttributeSetter(blender_obj, "scale"), "scale")
        obj.observe(KeyframeSetter(blender_obj, "scale"), "scale", type="keyframe")
        return blender_obj

    # -- Kubric's render loop, timed ---------------------------------------------------
    def render(self, frames: Sequence[int] | None = None, ignore_missing_textures: bool = False,
               return_layers: Sequence[str] = ("rgba", "segmentation")) -> dict:
        """Kubric's ``render`` (one Cycles render per frame, writing the PNG and the
        multilayer EXR, then ``postprocess``), with ``self.timings``:
        ``render_calls_s`` (Cycles: scene sync, sampling, the auxiliary layer, compositor
        and file writes) and ``pass_io_s`` (reading the files back, Kubric's
        post-processors). ``benchmarks/render.py`` splits the first further."""
        self.render_files(frames, ignore_missing_textures)
        t1 = time.perf_counter()
        out = self.postprocess(self.scratch_dir, return_layers=return_layers)
        self.timings["pass_io_s"] = time.perf_counter() - t1
        return out

    def render_files(self, frames: Sequence[int] | None = None,
                     ignore_missing_textures: bool = False) -> None:
        """The render calls alone: each frame's PNG and multilayer EXR land in
        ``scratch_dir``; ``postprocess`` (no bpy: numpy, OpenEXR, OpenCV) reads them back,
        which lets a worker do that beside the next scene's render. Sets
        ``self.timings["render_calls_s"]``."""
        if not ignore_missing_textures:
            self._check_missing_textures()
        self.set_exr_output_path(self.scratch_dir / "exr" / "frame_")
        if frames is None:
            frames = range(self.scene.frame_start, self.scene.frame_end + 1)
        t0 = time.perf_counter()
        scene = bpy.context.scene
        if self.one_call and list(frames) == list(range(scene.frame_start, scene.frame_end + 1)):
            # one animation render: Blender appends the frame number (frame_0001.png)
            scene.render.filepath = str(Path(self.scratch_dir) / "images" / "frame_")
            bpy.ops.render.render(animation=True)
        else:
            for frame_nr in frames:
                scene.frame_set(frame_nr)
                scene.render.filepath = str(
                    Path(self.scratch_dir) / "images" / f"frame_{frame_nr:04d}.png")
                bpy.ops.render.render(animation=False, write_still=True)
        self.timings = {"render_calls_s": time.perf_counter() - t0}

    # -- fix: cryptomatte channel case ---------------------------------------------
    def postprocess(self, from_dir, return_layers: Sequence[str]):
        """Same contract as Kubric's: stacks per-frame layers; reads EXRs with
        ``read_exr_layers`` (channel names matched case-insensitively)."""
        from_dir = Path(from_dir)
        stacks: dict[str, list] = {key: [] for key in return_layers}
        for exr_path in sorted((from_dir / "exr").glob("*.exr")):
            layers = read_exr_layers(exr_path)
            layers["rgba"] = read_png(from_dir / "images" / (exr_path.stem + ".png"))
            for key in return_layers:
                stacks[key].append(self.post_processors[key](layers, self.scene))
        return {key: np.stack(v, axis=0) for key, v in stacks.items() if v}


def read_png(path: Path) -> np.ndarray:
    """The PNG's pixels exactly as ``kubric.file_io.read_png`` returns them (H, W, C,
    uint8/uint16, RGB(A) order), decoded by OpenCV: Kubric's pure-Python ``pypng``
    decoder took ~40 ms per 128 px frame, about a tenth of a frame's whole cost."""
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise ValueError(f"{path}: not a readable PNG")
    if image.ndim == 2:
        return image[..., None]
    order = [2, 1, 0, 3][:image.shape[-1]] if image.shape[-1] in (3, 4) else slice(None)
    return np.ascontiguousarray(image[..., order])


def _bind(obj: core.Asset, trait: str, socket, converter=None) -> None:
    """Keep a Blender socket's default value in sync with a Kubric trait (now and at keyframes)."""
    kwargs = {} if converter is None else {"converter": converter}
    obj.observe(AttributeSetter(socket, "default_value", **kwargs), trait)
    obj.observe(KeyframeSetter(socket, "default_value"), trait, type="keyframe")


# Layer name in the EXR -> (key Kubric's post-processors use, channel suffixes).
_EXR_LAYERS = {
    "image": ("linear_rgba", "RGBA"),
    "depth": ("depth", "V"),
    "normal": ("normal", "XYZ"),
    "uv": ("uv", "XYZ"),
    "objectcoordinates": ("object_coordinates", "RGB"),
}


def read_exr_layers(path: Path) -> dict[str, np.ndarray]:
    """Read the multilayer EXR Kubric's compositor writes into the arrays Kubric's
    post-processors expect. Channel names are matched case-insensitively: Blender 4.5
    writes ``CryptoObject00.r`` where 2.93/4.2 wrote ``CryptoObject00.R``."""
    with OpenEXR.File(str(path), separate_channels=True) as exr:
        channels = {name.lower(): ch.pixels for name, ch in exr.channels().items()}

    def stack(layer: str, suffixes: str) -> np.ndarray:
        return np.stack([channels[f"{layer}.{s.lower()}"] for s in suffixes], axis=-1)

    out: dict[str, np.ndarray] = {}
    layer_names = {name.partition(".")[0] for name in channels}
    for layer, (key, suffixes) in _EXR_LAYERS.items():
        if layer in layer_names:
            out[key] = stack(layer, suffixes).astype(np.float32)
    if "vector" in layer_names:
        out.update(flows_from_vector_pass(channels))
    crypto = sorted(n for n in layer_names if n.startswith("cryptoobject"))
    if crypto:
        # Each cryptomatte layer holds two (id hash, coverage) rank pairs in RG and BA;
        # the hash is a float32 whose bits are the uint32 murmur hash.
        ids = np.concatenate([stack(layer, "rb") for layer in crypto], axis=-1)
        out["segmentation_indices"] = ids.astype(np.float32).view(np.uint32)
        alphas = np.concatenate([stack(layer, "ga") for layer in crypto], axis=-1)
        out["segmentation_alphas"] = alphas.astype(np.float32)
    return out


def flows_from_vector_pass(channels: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``forward_flow`` and ``backward_flow`` (H, W, 2) from the EXR's Vector pass
    (``channels``: lowercase name -> pixels), as ``(dx, dy)`` in pixels, x right and y
    down (OpenCV image axes): the displacement of the surface point seen at a pixel to
    where the next (forward) or previous (backward) frame sees it.

    Cycles' pass, in pixels with y up: X, Y = position in the previous frame minus
    position now; Z, W = position now minus position in the next frame. Measured on
    renders against the reprojection of static pixels (``tests/generation/render/
    test_render_labels.py``): forward = (-Z, W), backward = (X, -Y). The pass must hold
    all four channels (``Vector.X/Y/Z/W``, see ``Blender45._link_vector_pass``): an RGBA
    one, as Kubric's own compositor writes it on 4.x, has 1.0 in place of W."""
    if "vector.w" not in channels:
        raise ValueError("the EXR's Vector pass has no W channel (Kubric's RGBA routing "
                         "on Blender 4.x writes 1.0 in place of the next-frame y motion): "
                         "render with Blender45")
    x, y, z, w = (channels[f"vector.{c}"].astype(np.float32) for c in "xyzw")
    return {"backward_flow": np.stack([x, -y], axis=-1),
            "forward_flow": np.stack([-z, w], axis=-1)}
