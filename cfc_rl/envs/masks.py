"""Index layouts that split Gymnasium observations into positions (P) and velocities (V).

Every layout is read off the ``_get_obs`` method of the Gymnasium source it names (classic
control, and MuJoCo ``*_v5.py`` as of Gymnasium 1.x); ``tests/test_envs.py`` checks each one
against the simulator state (``data.qpos`` / ``data.qvel`` or the classic-control ``state``), so a
layout change upstream fails loudly instead of silently leaking velocities.

The P part keeps everything that describes *where* the system is (joint positions, angles and
their sin/cos, target positions, relative positions); the V part keeps the time derivatives
(``qvel``, possibly clipped by Gymnasium). Entries that are neither are dropped from both: the
only one is InvertedDoublePendulum's constraint force.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

__all__ = ["SPLITS", "ObservationSplit", "observation_split"]


@dataclass(frozen=True)
class ObservationSplit:
    """Where the positions and velocities sit in one Gymnasium environment's observation.

    :param base_id: the Gymnasium id the layout belongs to, e.g. ``"Hopper-v5"``
    :param obs_size: length of the full observation (checked when a task is built)
    :param positions: indices of positional entries, in Gymnasium's order
    :param velocities: indices of velocity entries, in Gymnasium's order
    :param dropped: indices that are neither (kept by neither part)
    :param env_kwargs: constructor arguments the layout depends on; they are always passed
        and a task refuses a different value for them
    :param parts: which parts are registered as ``cfc_rl/...`` ids
    :param layout: human-readable description of the full observation, for docs and errors
    """

    base_id: str
    obs_size: int
    positions: tuple[int, ...]
    velocities: tuple[int, ...]
    dropped: tuple[int, ...] = ()
    env_kwargs: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    parts: tuple[str, ...] = ("P", "V")
    layout: str = ""

    def indices(self, part: str) -> tuple[int, ...]:
        """The kept indices of one part.

        :param part: ``"P"`` (positions) or ``"V"`` (velocities)
        :return: indices into the full observation, in Gymnasium's order
        """
        if part == "P":
            return self.positions
        if part == "V":
            return self.velocities
        raise ValueError(f"part must be 'P' or 'V', got {part!r}")


def _r(start: int, stop: int) -> tuple[int, ...]:
    return tuple(range(start, stop))


# Environments whose ``exclude_current_positions_from_observation`` defaults to True drop the
# global x (and y) from qpos; the layouts below assume it, so it is pinned.
_EXCLUDE_XY = MappingProxyType({"exclude_current_positions_from_observation": True})

SPLITS: Mapping[str, ObservationSplit] = MappingProxyType(
    {
        s.base_id: s
        for s in (
            # classic_control/cartpole.py: state = (x, x_dot, theta, theta_dot)
            ObservationSplit(
                "CartPole-v1",
                4,
                positions=(0, 2),
                velocities=(1, 3),
                parts=("P",),
                layout="[x, x_dot, theta, theta_dot]",
            ),
            # classic_control/pendulum.py: (cos th, sin th, thdot)
            ObservationSplit(
                "Pendulum-v1",
                3,
                positions=(0, 1),
                velocities=(2,),
                parts=("P",),
                layout="[cos theta, sin theta, theta_dot]",
            ),
            # classic_control/continuous_mountain_car.py: state = (position, velocity)
            ObservationSplit(
                "MountainCarContinuous-v0",
                2,
                positions=(0,),
                velocities=(1,),
                parts=("P",),
                layout="[position, velocity]",
            ),
            # half_cheetah_v5.py: qpos[1:] (8), qvel (9)
            ObservationSplit(
                "HalfCheetah-v5",
                17,
                positions=_r(0, 8),
                velocities=_r(8, 17),
                env_kwargs=_EXCLUDE_XY,
                layout="[qpos[1:9], qvel[0:9]]",
            ),
            # hopper_v5.py: qpos[1:] (5), clip(qvel, -10, 10) (6)
            ObservationSplit(
                "Hopper-v5",
                11,
                positions=_r(0, 5),
                velocities=_r(5, 11),
                env_kwargs=_EXCLUDE_XY,
                layout="[qpos[1:6], clip(qvel[0:6], -10, 10)]",
            ),
            # walker2d_v5.py: qpos[1:] (8), clip(qvel, -10, 10) (9)
            ObservationSplit(
                "Walker2d-v5",
                17,
                positions=_r(0, 8),
                velocities=_r(8, 17),
                env_kwargs=_EXCLUDE_XY,
                layout="[qpos[1:9], clip(qvel[0:9], -10, 10)]",
            ),
            # ant_v5.py: qpos[2:] (13: torso z, torso quaternion, 8 joints), qvel (14); the 78
            # external contact forces are switched off (neither P nor V, and mostly zeros)
            ObservationSplit(
                "Ant-v5",
                27,
                positions=_r(0, 13),
                velocities=_r(13, 27),
                env_kwargs=MappingProxyType(
                    {**_EXCLUDE_XY, "include_cfrc_ext_in_observation": False}
                ),
                layout="[qpos[2:15], qvel[0:14]]",
            ),
            # inverted_pendulum_v5.py: qpos (cart x, pole angle), qvel (2)
            ObservationSplit(
                "InvertedPendulum-v5",
                4,
                positions=(0, 1),
                velocities=(2, 3),
                layout="[qpos[0:2], qvel[0:2]]",
            ),
            # inverted_double_pendulum_v5.py: cart x, sin(angles) (2), cos(angles) (2),
            # clip(qvel, -10, 10) (3), clip(qfrc_constraint, -10, 10)[:1]; the constraint force
            # is neither a position nor a velocity, so both parts drop it
            ObservationSplit(
                "InvertedDoublePendulum-v5",
                9,
                positions=_r(0, 5),
                velocities=_r(5, 8),
                dropped=(8,),
                layout="[qpos[0], sin(qpos[1:3]), cos(qpos[1:3]), clip(qvel[0:3], -10, 10), "
                "clip(qfrc_constraint[0], -10, 10)]",
            ),
            # swimmer_v5.py: qpos[2:] (3: body angle, 2 joints), qvel (5)
            ObservationSplit(
                "Swimmer-v5",
                8,
                positions=_r(0, 3),
                velocities=_r(3, 8),
                env_kwargs=_EXCLUDE_XY,
                layout="[qpos[2:5], qvel[0:5]]",
            ),
            # reacher_v5.py: cos(qpos[:2]), sin(qpos[:2]), target qpos[2:4], qvel[:2],
            # (fingertip - target)[:2]; the fingertip-target vector is positional. Reacher-V
            # sees only the two joint velocities, so it cannot know where the target is.
            ObservationSplit(
                "Reacher-v5",
                10,
                positions=(0, 1, 2, 3, 4, 5, 8, 9),
                velocities=(6, 7),
                layout="[cos(qpos[0:2]), sin(qpos[0:2]), qpos[2:4], qvel[0:2], "
                "(fingertip - target)[0:2]]",
            ),
        )
    }
)


def observation_split(base_id: str) -> ObservationSplit:
    """The P/V layout of a Gymnasium environment.

    :param base_id: a Gymnasium id such as ``"Walker2d-v5"``
    :return: its :class:`ObservationSplit`
    :raises ValueError: when no split is defined for ``base_id``; the message lists the known ones
    """
    try:
        return SPLITS[base_id]
    except KeyError:
        raise ValueError(
            f"no position/velocity split is defined for {base_id!r}; "
            f"known environments: {', '.join(SPLITS)}"
        ) from None
