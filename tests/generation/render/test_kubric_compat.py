"""One test per Blender 4.5 fix in generation/render/kubric_compat.py, each checking the
label (or pixels) the fix affects on a real render."""

import tempfile
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.blender

RES = 32


def make_scene(*, spp=4, denoise=False, view_transform="Filmic", sun=True):
    import kubric as kb

    from generation.render.kubric_compat import Blender45

    scene = kb.Scene(resolution=(RES, RES), frame_start=1, frame_end=1)
    renderer = Blender45(scene, scratch_dir=tempfile.mkdtemp(), samples_per_pixel=spp,
                         use_denoising=denoise, view_transform=view_transform)
    scene += kb.Cube(name="floor", scale=(10, 10, 0.5), position=(0, 0, -0.5), static=True,
                     material=kb.PrincipledBSDFMaterial(color=kb.Color(0.5, 0.5, 0.5)))
    if sun:
        scene += kb.DirectionalLight(name="sun", position=(2, -3, 6), look_at=(0, 0, 0),
                                     intensity=3)
    scene.ambient_illumination = kb.Color(0.1, 0.1, 0.1)
    scene.camera = kb.PerspectiveCamera(name="camera", position=(0, -6, 4), look_at=(0, 0, 0.5))
    return kb, scene, renderer


def pixels_of(out, scene, asset):
    index = scene.assets.index(asset) + 1
    return out["segmentation"][0, ..., 0] == index


def test_principled_bsdf_sockets_are_bound_and_colour_renders():
    import bpy
    kb, scene, renderer = make_scene()
    red = kb.PrincipledBSDFMaterial(name="red", color=kb.Color(0.9, 0.05, 0.05), specular=0.3,
                                    specular_tint=1.0, transmission=0.25, roughness=0.6)
    cube = kb.Cube(name="cube", scale=0.8, position=(0, 0, 0.8), material=red)
    glow = kb.PrincipledBSDFMaterial(name="glow", color=kb.Color(0, 0, 0),
                                     emission=kb.Color(0.0, 1.0, 0.0))
    ball = kb.Sphere(name="ball", scale=0.5, position=(1.8, 0.5, 0.5), material=glow)
    scene += cube
    scene += ball
    bsdf = bpy.data.materials[red.uid].node_tree.nodes["Principled BSDF"]
    assert bsdf.inputs["Specular IOR Level"].default_value == pytest.approx(0.3)
    assert bsdf.inputs["Transmission Weight"].default_value == pytest.approx(0.25)
    # tint 1 -> the specular colour is the base colour
    assert tuple(bsdf.inputs["Specular Tint"].default_value)[:3] == pytest.approx((0.9, 0.05, 0.05))
    red.roughness = 0.2   # Kubric's observers keep the socket in sync
    assert bsdf.inputs["Roughness"].default_value == pytest.approx(0.2)

    out = renderer.render(return_layers=("rgba", "segmentation"))
    rgb = out["rgba"][0, ..., :3].astype(float)
    on_cube = rgb[pixels_of(out, scene, cube)]
    assert len(on_cube) > 20
    assert on_cube[:, 0].mean() > 2 * on_cube[:, 1:].mean()
    on_ball = rgb[pixels_of(out, scene, ball)]
    assert len(on_ball) > 5
    assert on_ball[:, 1].mean() > 2 * max(on_ball[:, 0].mean(), on_ball[:, 2].mean())


def test_object_coordinates_aov_is_filled():
    kb, scene, renderer = make_scene(spp=1)
    cube = kb.Cube(name="cube", scale=1.0, position=(0, 0, 1.0),
                   material=kb.PrincipledBSDFMaterial())
    scene += cube
    out = renderer.render(return_layers=("object_coordinates", "segmentation"))
    coords = out["object_coordinates"][0].astype(float) / 65535
    on_cube = coords[pixels_of(out, scene, cube)]
    assert len(on_cube) > 30
    # Generated coordinates of a box surface: some coordinate is at 0 or 1 on every face.
    distance_to_face = np.minimum(on_cube, 1 - on_cube).min(axis=1)
    assert np.mean(distance_to_face < 0.02) > 0.95
    assert on_cube.std(axis=0).max() > 0.1   # not a constant (Kubric on 4.5: all zeros)


def test_obj_asset_imports_unrotated():
    import bpy

    from generation.render.assets import DEFAULT_MANIFEST
    kb, scene, renderer = make_scene()
    with kb.AssetSource.from_manifest(str(DEFAULT_MANIFEST)) as source:
        pyramid = source.create(asset_id="pyramid")
        scene += pyramid
        obj_file = Path(pyramid.render_filename)
        expected = np.array([[float(x) for x in line.split()[1:]]
                             for line in obj_file.read_text().splitlines()
                             if line.startswith("v ")])
        mesh = bpy.data.objects[pyramid.uid].data
        got = np.array([v.co[:] for v in mesh.vertices])
    assert got.shape == expected.shape
    # Same vertices in the same axes (Z up, as PyBullet sees the URDF): no axis swap.
    assert np.allclose(np.sort(got, axis=0), np.sort(expected, axis=0), atol=1e-5)
    assert got[:, 2].max() == pytest.approx(expected[:, 2].max(), abs=1e-5)


def test_cryptomatte_channels_are_read_case_insensitively():
    import OpenEXR
    from kubric.renderer.blender_utils import mm3hash

    from generation.render.kubric_compat import read_exr_layers
    kb, scene, renderer = make_scene(spp=1)
    cube = kb.Cube(name="cube", scale=0.8, position=(0, 0, 0.8),
                   material=kb.PrincipledBSDFMaterial())
    scene += cube
    out = renderer.render(return_layers=("segmentation",))
    exr_path = sorted((Path(renderer.scratch_dir) / "exr").glob("*.exr"))[0]
    with OpenEXR.File(str(exr_path)) as exr:
        names = list(exr.channels())
    # Blender 4.5 writes lowercase cryptomatte channels (Kubric expects "CryptoObject00.R").
    assert any(n.startswith("CryptoObject00.") for n in names) or any(
        n.lower().startswith("cryptoobject00.") for n in names)
    layers = read_exr_layers(exr_path)
    hashes = set(np.unique(layers["segmentation_indices"][..., 0]).tolist())
    floor = next(a for a in scene.assets if a.name == "floor")
    assert mm3hash(cube.uid) in hashes and mm3hash(floor.uid) in hashes
    # ...and Kubric's post-processing maps them to asset indices
    assert pixels_of(out, scene, cube).sum() > 20


def test_view_transform_is_filmic_and_changes_pixels():
    import bpy
    kb, scene, renderer = make_scene(spp=4)
    assert bpy.context.scene.view_settings.view_transform == "Filmic"
    filmic = renderer.render(return_layers=("rgba",))["rgba"][0, ..., :3].astype(float)
    kb, scene, renderer = make_scene(spp=4, view_transform="AgX")
    agx = renderer.render(return_layers=("rgba",))["rgba"][0, ..., :3].astype(float)
    assert np.abs(filmic - agx).mean() > 2.0


def test_openimagedenoise_replaces_nlm_and_denoises():
    import bpy

    def floor_noise(denoise):
        # Sky light only: at 2 spp its soft shadows are noisy, which is what denoising is for.
        kb, scene, renderer = make_scene(spp=2, denoise=denoise, sun=False)
        scene.ambient_illumination = kb.Color(1, 1, 1)
        scene += kb.Cube(name="cube", scale=0.8, position=(0, 0, 0.8),
                         material=kb.PrincipledBSDFMaterial())
        if denoise:
            assert bpy.context.scene.cycles.denoiser == "OPENIMAGEDENOISE"
        rgb = renderer.render(return_layers=("rgba",))["rgba"][0, ..., :3].astype(float)
        gray = rgb.mean(axis=-1)[RES // 2:]   # the floor in front of the cube
        # high-frequency energy: difference to the 4-neighbour mean
        lap = gray[1:-1, 1:-1] - 0.25 * (gray[:-2, 1:-1] + gray[2:, 1:-1] + gray[1:-1, :-2]
                                         + gray[1:-1, 2:])
        return np.abs(lap).mean()

    assert floor_noise(True) < 0.5 * floor_noise(False)


def test_png_reader_returns_what_kubrics_reader_returns(tmp_path):
    from kubric import file_io

    from generation.render.kubric_compat import read_png
    rng = np.random.default_rng(0)
    for shape, dtype in (((5, 7, 4), np.uint8), ((5, 7, 3), np.uint8), ((6, 4, 1), np.uint16),
                         ((6, 4, 3), np.uint16)):
        data = rng.integers(0, np.iinfo(dtype).max, shape, endpoint=True).astype(dtype)
        path = tmp_path / f"{len(shape)}_{shape[-1]}_{dtype.__name__}.png"
        file_io.write_png(data, path)
        ours, kubrics = read_png(path), file_io.read_png(path)
        assert ours.dtype == kubrics.dtype and np.array_equal(ours, kubrics)
        assert np.array_equal(ours, data)


def _moving_cube_renderer(**options):
    """A 3-frame scene whose cube moves (so segmentation and flow change), at 2 spp
    without denoising, ready for ``render``; ``options`` go to ``Blender45``."""
    import kubric as kb

    from generation.render.kubric_compat import Blender45

    scene = kb.Scene(resolution=(RES, RES), frame_start=1, frame_end=3)
    renderer = Blender45(scene, scratch_dir=tempfile.mkdtemp(), samples_per_pixel=2,
                         use_denoising=False, **options)
    scene += kb.Cube(name="floor", scale=(10, 10, 0.5), position=(0, 0, -0.5),
                     static=True, material=kb.PrincipledBSDFMaterial())
    cube = kb.Cube(name="cube", scale=0.6, position=(0, 0, 0.6),
                   material=kb.PrincipledBSDFMaterial(color=kb.Color(0.8, 0.2, 0.1)))
    scene += cube
    scene += kb.DirectionalLight(name="sun", position=(2, -3, 6), look_at=(0, 0, 0))
    scene.camera = kb.PerspectiveCamera(name="camera", position=(0, -6, 4),
                                        look_at=(0, 0, 0.5))
    for frame, x in ((1, -1.0), (2, 0.0), (3, 1.0)):   # the cube moves
        cube.position = (x, 0, 0.6)
        cube.keyframe_insert("position", frame)
    return renderer


def test_one_animation_render_equals_the_per_frame_loop():
    """render_clip's setting (one render call for all frames) gives exactly the bytes
    of Kubric's one-call-per-frame loop, RGB and every pass."""
    def render(**options):
        renderer = _moving_cube_renderer(**options)
        return renderer.render(return_layers=("rgba", "z", "normal_float", "segmentation"))

    loop, one = render(), render(one_call=True)
    assert loop["rgba"].shape == (3, RES, RES, 4)
    assert not np.array_equal(loop["segmentation"][0], loop["segmentation"][2])   # it moved
    for key in loop:
        assert np.array_equal(loop[key], one[key]), key


def test_dropping_vector_and_uv_passes_keeps_every_other_byte():
    """render_clip drops the auxiliary layer's UV pass always and its Vector pass when
    flow is off: RGB and every other pass keep Kubric's bytes (all passes on), the EXR
    loses just those channels, and with flow on the flows are unchanged."""
    import kubric as kb

    from generation.render.kubric_compat import Blender45, read_exr_layers

    layers = ("rgba", "z", "normal_float", "segmentation", "object_coordinates")
    flows = ("forward_flow", "backward_flow")

    def render(**options):
        renderer = _moving_cube_renderer(one_call=True, **options)
        wanted = layers + (flows if options.get("flow", True) else ())
        out = renderer.render(return_layers=wanted)
        exr = read_exr_layers(next((renderer.scratch_dir / "exr").glob("*.exr")))
        return out, exr

    (kubrics, kubric_exr), (no_flow, no_flow_exr), (flow, flow_exr) = (
        render(), render(flow=False, uv=False), render(flow=True, uv=False))
    assert {"uv", "forward_flow"} <= set(kubric_exr)
    assert not {"uv", "forward_flow", "backward_flow"} & set(no_flow_exr)
    assert "uv" not in flow_exr and "forward_flow" in flow_exr
    assert np.abs(kubrics["forward_flow"]).max() > 0.5   # the cube's motion is in it
    for key in layers:
        assert np.array_equal(kubrics[key], no_flow[key]), key
    for key in layers + flows:
        assert np.array_equal(kubrics[key], flow[key]), key
    with pytest.raises(ValueError, match="motion_blur needs the Vector pass"):
        Blender45(kb.Scene(resolution=(RES, RES)), scratch_dir=tempfile.mkdtemp(),
                  flow=False, motion_blur=0.5)


def test_vector_pass_is_written_whole_and_read_as_pixel_flows():
    """Blender 4.x turns the Vector pass into a colour (x, y, z, 1.0) before Kubric's
    separate/combine RGBA pair, so Kubric's EXR held 1.0 in place of the next-frame y
    motion. Linked straight to the file output it is written as Vector.X/Y/Z/W, and read
    as (dx, dy) pixels, y down: the cube moves +1 m along the camera's x axis per frame
    (at constant camera depth z), so in the middle frame its pixels move by
    (+f/z, 0) to the next frame and (-f/z, 0) to the previous one."""
    import OpenEXR

    from generation.render.kubric_compat import flows_from_vector_pass, read_exr_layers

    renderer = _moving_cube_renderer(one_call=True, uv=False)
    out = renderer.render(return_layers=("z", "segmentation", "forward_flow", "backward_flow"))
    exr_path = sorted((Path(renderer.scratch_dir) / "exr").glob("*.exr"))[1]
    with OpenEXR.File(str(exr_path), separate_channels=True) as exr:
        channels = {n.lower(): c.pixels for n, c in exr.channels().items()}
    assert {"vector.x", "vector.y", "vector.z", "vector.w"} <= set(channels)
    assert not any(np.all(channels[f"vector.{c}"] == 1.0) for c in "xyzw")
    assert np.array_equal(read_exr_layers(exr_path)["forward_flow"], out["forward_flow"][1])

    def inner(name):    # the asset's pixels whose 3x3 neighbourhood is all that asset
        index = next(i for i, a in enumerate(renderer.scene.assets, 1) if a.name == name)
        seg = out["segmentation"][1, ..., 0] == index
        mask = seg.copy()
        for dv in (-1, 0, 1):
            for du in (-1, 0, 1):
                mask[max(0, dv):RES + min(0, dv), max(0, du):RES + min(0, du)] &= \
                    seg[max(0, -dv):RES + min(0, -dv), max(0, -du):RES + min(0, -du)]
        return mask

    cube = inner("cube")
    assert cube.sum() >= 4
    camera = renderer.scene.camera
    expected = camera.focal_length / camera.sensor_width * RES / out["z"][1, ..., 0][cube]
    forward, backward = out["forward_flow"][1][cube], out["backward_flow"][1][cube]
    assert np.abs(forward[:, 0] - expected).max() < 0.01 and np.abs(forward[:, 1]).max() < 0.01
    assert np.abs(backward[:, 0] + expected).max() < 0.01 and np.abs(backward[:, 1]).max() < 0.01
    for flow in ("forward_flow", "backward_flow"):      # the floor and camera hold still
        assert np.abs(out[flow][1][inner("floor")]).max() < 1e-3
    with pytest.raises(ValueError, match="no W channel"):
        flows_from_vector_pass({f"vector.{c}": channels[f"vector.{c}"] for c in "xyz"}
                               | {"vector.a": np.ones_like(channels["vector.x"])})


def test_pass_files_without_compression_or_unread_slots_keep_every_array():
    """render_clip writes its pass files uncompressed and without the EXR's linear image
    (never read) and object coordinates (unless asked for): every array read back is
    Kubric's, and the files really are written the other way."""
    from generation.render.kubric_compat import read_exr_layers

    layers = ("rgba", "z", "normal_float", "segmentation")

    def render(**options):
        renderer = _moving_cube_renderer(one_call=True, **options)
        out = renderer.render(return_layers=layers)
        scratch = Path(renderer.scratch_dir)
        exr, png = next((scratch / "exr").glob("*.exr")), next((scratch / "images").glob("*.png"))
        return out, set(read_exr_layers(exr)), exr.stat().st_size, png.stat().st_size

    kubrics, kubric_layers, kubric_exr, kubric_png = render()
    ours, our_layers, our_exr, our_png = render(object_coordinates=False, linear_image=False,
                                                compress_scratch=False)
    assert {"linear_rgba", "object_coordinates"} <= kubric_layers
    assert kubric_layers - our_layers == {"linear_rgba", "object_coordinates"}
    assert our_png > kubric_png                      # stored, not deflated
    # 5 float channels fewer, but uncompressed: still larger than Kubric's ZIP'd file
    assert our_exr > kubric_exr
    for key in layers:
        assert np.array_equal(kubrics[key], ours[key]), key
