"""Kubric's PyBullet view on one physics connection per process.

Kubric's ``PyBullet`` opens a new ``pybullet.connect(DIRECT)`` for every scene and
closes it when the view is garbage-collected. Opening one costs ~12-17 ms, about a sixth
of a 128 px scene's build. ``PyBullet`` here keeps the process's one connection and
empties it with ``resetSimulation`` when the next scene takes it: Bullet then deletes
and recreates its dynamics world, so each scene starts from the state a new
connection has. Kubric's engine parameters are set again for every scene, so the
simulation and the clip bytes are the same as with a new connection
(``tests/generation/render/test_physics.py``).

Only one scene uses the connection at a time. A scene's view that is still reachable
when a later scene has taken the connection (the worker finishes scene N's labels while
scene N+1 builds) raises on any physics call: its body ids would name the later
scene's bodies.
"""

from __future__ import annotations

import pybullet as pb
from kubric import core
from kubric.simulator import pybullet as kubric_pybullet

# The parameters Kubric's PyBullet.__init__ sets on every new connection (its fix for
# the sticky-walls problem, bullet3 issue 3094). tests/generation/render/test_physics.py checks
# the engine against a new Kubric connection and the trajectories against Kubric's view.
KUBRIC_ENGINE_PARAMETERS = dict(restitutionVelocityThreshold=0.0, warmStartingFactor=0.0,
                                useSplitImpulse=True, contactSlop=0.0,
                                enableConeFriction=False, deterministicOverlappingPairs=True)


class SceneBulletClient(kubric_pybullet._BulletClient):
    """One scene's lease on the process's DIRECT connection (Kubric's client API:
    ``client.<pybullet function>(...)`` with the connection id filled in)."""

    _connection: int | None = None       # the process's connection id
    _holder: SceneBulletClient | None = None

    def __init__(self, connection_mode: int = pb.DIRECT):
        cls = SceneBulletClient
        if cls._connection is None or not pb.isConnected(physicsClientId=cls._connection):
            cls._connection = pb.connect(connection_mode)
        else:
            pb.resetSimulation(physicsClientId=cls._connection)
        self._client = cls._connection
        cls._holder = self

    def __getattr__(self, name):
        if SceneBulletClient._holder is not self:
            raise RuntimeError(f"pybullet.{name} on a scene whose physics connection a "
                               "later scene has taken")
        return super().__getattr__(name)

    def __del__(self):
        pass        # the connection outlives the scene: the next one resets it


class PyBullet(kubric_pybullet.PyBullet):
    """Kubric's PyBullet view (``kubric.simulator.PyBullet``) on the shared connection."""

    def __init__(self, scene: core.Scene, scratch_dir=None):
        # Kubric's __init__, with the shared connection in place of a new one. Its
        # scratch_dir is only read by save_state (which asserts it is set); Kubric's
        # default, one mkdtemp() per process made at import, is not repeated here.
        self.scratch_dir = scratch_dir
        self._physics_client = SceneBulletClient(pb.DIRECT)
        self._physics_client.setPhysicsEngineParameter(**KUBRIC_ENGINE_PARAMETERS)
        core.View.__init__(self, scene, scene_observers={
            "gravity": [lambda change: self._physics_client.setGravity(*change.new)],
        })
