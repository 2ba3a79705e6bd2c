"""The Blender side of ``generation.render.procedural``: shader nodes for a
``ProceduralMaterial``, the world of an ``HdriWorld``, and Cycles motion blur that
leaves the labels at the shutter's centre. Runs in the render worker only (bpy)."""

from __future__ import annotations

from pathlib import Path

import bpy

from generation.render.procedural import PATTERNS, HdriWorld, ProceduralMaterial


def _rgba_socket(sockets, name: str):
    return next(s for s in sockets if s.name == name and s.type == "RGBA")


def build_material(obj: ProceduralMaterial, bind) -> "bpy.types.Material":
    """A node material for ``obj``; ``bind(trait, socket)`` keeps a socket in sync
    with a trait (kubric_compat's ``_bind``)."""
    if obj.pattern not in PATTERNS:
        raise ValueError(f"unknown procedural pattern {obj.pattern!r} (known: {sorted(PATTERNS)})")
    mat = bpy.data.materials.new(obj.uid)
    mat.use_nodes = True
    nodes, links = mat.node_tree.nodes, mat.node_tree.links
    bsdf = nodes["Principled BSDF"]
    coords = nodes.new("ShaderNodeTexCoord")
    texture = nodes.new(f"ShaderNodeTex{obj.pattern.capitalize()}")
    links.new(coords.outputs["Generated"], texture.inputs["Vector"])
    mix = nodes.new("ShaderNodeMix")
    mix.data_type = "RGBA"
    links.new(texture.outputs[PATTERNS[obj.pattern]], mix.inputs["Factor"])
    links.new(mix.outputs[2], bsdf.inputs["Base Color"])          # the RGBA result
    bind("color_a", _rgba_socket(mix.inputs, "A"))
    bind("color_b", _rgba_socket(mix.inputs, "B"))
    bind("scale", texture.inputs["Scale"])
    if "Distortion" in texture.inputs:
        bind("distortion", texture.inputs["Distortion"])
    bind("roughness", bsdf.inputs["Roughness"])
    bind("metallic", bsdf.inputs["Metallic"])
    return mat


def hdri_path(name: str) -> Path:
    """One of Blender's studio-light worlds, from the bpy wheel's own data files."""
    path = Path(bpy.utils.system_resource("DATAFILES")) / "studiolights" / "world" / f"{name}.exr"
    if not path.is_file():
        raise ValueError(f"HDRI {name!r} not found at {path}")
    return path


def apply_world(renderer, world: HdriWorld) -> None:
    """Light (rays that are not camera rays) and background (camera rays) from the same
    HDRI, rotated about z and scaled by ``strength``, through Kubric's world nodes. The
    background is no surface: its pixels keep z = 1e10 (depth +inf) and no cryptomatte
    id (instance 0), as the flat sky colour did."""
    path = str(hdri_path(world.name))
    rotation = (0.0, 0.0, world.rotation_z)
    renderer._set_ambient_light_hdri(path, rotation, world.strength)
    renderer._set_background_hdri(path, rotation)
    renderer.bg_node.inputs["Strength"].default_value = world.strength
    # Cycles' "Automatic" importance map for these 1024x512 images is 4096x2048, rebuilt
    # for every frame: 2-4 s/frame on 2 CPU cores, most of an HDRI recipe's render at 64
    # px. A map with one cell per texel samples the same image; measured at 64 px, 16
    # spp, 0.21 s/frame instead of 2.9-3.9, labels byte-identical (docs/performance.md,
    # "Why the HDRI recipes were slow").
    settings = bpy.context.scene.world.cycles
    settings.sampling_method = "MANUAL"
    settings.sample_map_resolution = renderer.ambient_hdri_node.image.size[0]


def apply_motion_blur(shutter: float) -> None:
    """Cycles motion blur on the RGB layer only, the shutter centred on each frame.

    The label passes must be exact for the frame's time (the shutter's centre), but
    Cycles samples each pixel's rays over the whole shutter: the auxiliary layer's one
    sample (cryptomatte, normals, object coordinates, Vector) would come from a random
    time in it, and so would the main layer's Z pass (written by its first sample).
    So the auxiliary layer renders without motion blur (``ViewLayer.use_motion_blur``)
    and the depth comes from it instead of the main layer."""
    scene = bpy.context.scene
    scene.render.use_motion_blur = True
    scene.render.motion_blur_shutter = shutter
    scene.render.motion_blur_position = "CENTER"
    main, aux = scene.view_layers[0], scene.view_layers["AuxOutputs"]
    main.use_motion_blur = True
    aux.use_motion_blur = False
    aux.use_pass_z = True
    main.use_pass_z = False
    tree = scene.node_tree
    aux_node = next(n for n in tree.nodes if n.bl_idname == "CompositorNodeRLayers"
                    and n.layer == "AuxOutputs")
    out = next(n for n in tree.nodes if n.bl_idname == "CompositorNodeOutputFile")
    tree.links.new(aux_node.outputs["Depth"], out.inputs["Depth"])


def apply_content(renderer, content) -> None:
    """What a recipe's ``SceneContent`` asks of Blender beyond Kubric's scene."""
    if content.world is not None:
        apply_world(renderer, content.world)
    if content.motion_blur_shutter > 0:
        apply_motion_blur(content.motion_blur_shutter)
