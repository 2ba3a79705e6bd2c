"""generation.render.physics: Kubric's PyBullet view on the process's one connection behaves
as Kubric's own view on a new connection per scene (no Blender needed: the scenes are
built without a renderer, so only Kubric's scene and PyBullet see them)."""

import numpy as np
import pybullet as pb
import pytest


def _build(seed: int, simulator_class):
    """The MOVi recipe's scene ``seed`` simulated by ``simulator_class``: every placed
    object's keyframes (position, quaternion, velocities) by name."""
    import kubric as kb

    from generation.config import SceneConfig
    from generation.render.asset_cache import asset_source
    from generation.render.assets import DEFAULT_MANIFEST, load_manifest
    from generation.render.recipes import movi

    cfg = SceneConfig(resolution=32, frames=6)
    scene = kb.Scene(resolution=(32, 32), frame_start=1, frame_end=cfg.frames,
                     frame_rate=cfg.fps, step_rate=240)
    original = movi.PyBullet
    movi.PyBullet = simulator_class
    try:
        ids = sorted(load_manifest(DEFAULT_MANIFEST)["assets"])
        content = movi.build(scene, cfg, np.random.RandomState(seed),
                             asset_source(DEFAULT_MANIFEST), ids)
    finally:
        movi.PyBullet = original
    return {obj.name: {member: {f: np.asarray(v) for f, v in frames.items()}
                       for member, frames in obj.keyframes.items()}
            for obj in content.objects}


def test_scenes_on_the_shared_connection_move_exactly_as_on_new_connections():
    """Seeds 5, 402 and 9, each on a new connection (Kubric's view) and then one after
    another on the shared one, after an unrelated scene: the same objects with the same
    trajectories, bit for bit. Seed 402 removes a shape it cannot place (a body removed
    from the world before the simulation), so the reset after it is exercised too."""
    from kubric.simulator import PyBullet as KubricPyBullet

    from generation.render.physics import PyBullet

    fresh = {seed: _build(seed, KubricPyBullet) for seed in (5, 402, 9)}
    _build(11, PyBullet)
    shared = {seed: _build(seed, PyBullet) for seed in (5, 402, 9)}
    assert len(fresh[402]) == 9        # the unplaceable 10th shape is left out
    for seed in fresh:
        assert fresh[seed].keys() == shared[seed].keys(), seed
        for name, members in fresh[seed].items():
            assert {"position", "quaternion"} <= members.keys()
            for member, frames in members.items():
                assert frames.keys() == shared[seed][name][member].keys()
                for frame, value in frames.items():
                    assert np.array_equal(value, shared[seed][name][member][frame]), (
                        seed, name, member, frame)
    path = next(iter(fresh[5].values()))["position"]
    assert not np.array_equal(path[min(path)], path[max(path)])   # the simulation ran


def test_one_connection_serves_every_scene_with_kubrics_parameters():
    """One connection for the whole process, emptied for each scene, with the engine
    parameters and gravity a new Kubric connection has."""
    import kubric as kb
    from kubric.simulator import PyBullet as KubricPyBullet

    from generation.render.physics import PyBullet

    kubric_view = KubricPyBullet(kb.Scene())
    reference = pb.getPhysicsEngineParameters(physicsClientId=kubric_view.physics_client)
    first = PyBullet(kb.Scene())
    first._physics_client.createMultiBody(1.0, first._physics_client.createCollisionShape(
        pb.GEOM_SPHERE, radius=0.5))
    second = PyBullet(kb.Scene())
    assert second.physics_client == first.physics_client
    assert pb.getNumBodies(physicsClientId=second.physics_client) == 0
    assert pb.getPhysicsEngineParameters(physicsClientId=second.physics_client) == reference


def test_a_scene_whose_connection_was_taken_cannot_touch_the_next_scenes_bodies():
    """Body ids restart at 0 after a reset, so a stale view's call would move the later
    scene's objects; it raises instead, naming the call."""
    import kubric as kb

    from generation.render.physics import PyBullet

    stale = PyBullet(kb.Scene())
    PyBullet(kb.Scene())
    with pytest.raises(RuntimeError, match="pybullet.getNumBodies on a scene whose physics"):
        stale._physics_client.getNumBodies()
