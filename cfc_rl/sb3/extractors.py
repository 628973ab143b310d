"""Features extractors that put a recurrent cell into ANY Stable-Baselines3 algorithm.

:class:`SequenceExtractor` reads a window of past observations (SB3's own ``VecFrameStack``
layout, or the ``HistoryWindow`` layout of :mod:`cfc_rl.envs`) and returns the cell's last
output, so PPO, A2C, SAC, TD3 and DQN get memory without any change to the algorithm.

:class:`ElapsedTimeExtractor` is the features extractor that :class:`RecurrentCellPolicy`
uses for observations that report elapsed time (a Dict with a ``"dt"`` entry, as the
``IrregularTime`` wrapper produces): it flattens the other entries and appends Δt, untouched,
as the last feature, where the policy's cell takes it as its ``timespans``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces
from stable_baselines3.common.torch_layers import (
    BaseFeaturesExtractor,
    CombinedExtractor,
    FlattenExtractor,
)
from stable_baselines3.common.vec_env import VecEnv, VecEnvWrapper, VecFrameStack
from torch import Tensor

from cfc_rl.nn import cell_input_size, make_cell, time_input

OBS_KEY, DT_KEY, VALID_KEY = "obs", "dt", "valid"

_LAYOUTS = (
    "a flat Box of n_stack frames, oldest first (SB3's VecFrameStack; pass n_stack), or a Dict "
    f"with {OBS_KEY!r} of shape (K, n) (cfc_rl.envs.HistoryWindow) or (K*n,) (with n_stack), "
    f"and optionally {DT_KEY!r} and {VALID_KEY!r} of K entries each"
)


@dataclass(frozen=True)
class WindowLayout:
    """How a window of K frames of n features is laid out in an observation.

    :param frames: K, the number of frames in the window
    :param features: n, the features of one frame
    :param has_dt: whether the observation has the elapsed time of each frame
    :param has_valid: whether the observation flags which frames are real (not padding)
    """

    frames: int
    features: int
    has_dt: bool
    has_valid: bool

    @classmethod
    def from_space(cls, space: spaces.Space, n_stack: int | None) -> WindowLayout:
        """Read the layout of ``space``; raise a ValueError that says what was expected."""
        if isinstance(space, spaces.Dict):
            if OBS_KEY not in space.spaces or not isinstance(space[OBS_KEY], spaces.Box):
                raise ValueError(f"SequenceExtractor cannot read {space}: expected {_LAYOUTS}")
            unknown = set(space.spaces) - {OBS_KEY, DT_KEY, VALID_KEY}
            if unknown:
                raise ValueError(
                    f"SequenceExtractor cannot read the Dict keys {sorted(unknown)}: expected "
                    f"{_LAYOUTS}"
                )
            shape = space[OBS_KEY].shape
            if len(shape) == 2:
                frames, features = shape
                if n_stack is not None and n_stack != frames:
                    raise ValueError(
                        f"n_stack={n_stack} but the observation holds {frames} frames {shape}"
                    )
            elif len(shape) == 1:
                frames, features = cls._split_flat(space[OBS_KEY], n_stack)
            else:
                raise ValueError(f"SequenceExtractor cannot read {OBS_KEY!r} of shape {shape}")
            for key in (DT_KEY, VALID_KEY):
                if key in space.spaces and math.prod(space[key].shape) != frames:
                    raise ValueError(
                        f"{key!r} has shape {space[key].shape}; expected one entry per frame "
                        f"({frames})"
                    )
            return cls(frames, features, DT_KEY in space.spaces, VALID_KEY in space.spaces)
        if isinstance(space, spaces.Box) and len(space.shape) == 1:
            frames, features = cls._split_flat(space, n_stack)
            return cls(frames, features, has_dt=False, has_valid=False)
        raise ValueError(f"SequenceExtractor cannot read {space}: expected {_LAYOUTS}")

    @staticmethod
    def _split_flat(box: spaces.Box, n_stack: int | None) -> tuple[int, int]:
        """Frames and features of a flat Box of ``n_stack`` frames, checked against its size
        and, where they tell, its bounds (see :func:`stack_sizes_allowed_by_bounds`)."""
        size = box.shape[0]
        if n_stack is None:
            raise ValueError(
                f"a flat observation of size {size} needs n_stack, the number of stacked "
                "frames (the n_stack of VecFrameStack; sequence_extractor_kwargs(env) reads it)"
            )
        if n_stack < 1 or size % n_stack != 0:
            raise ValueError(
                f"n_stack={n_stack} does not divide the observation size {size}; it must be "
                "the n_stack given to VecFrameStack"
            )
        allowed = stack_sizes_allowed_by_bounds(box)
        if n_stack not in allowed:
            largest = max(allowed)
            raise ValueError(
                f"n_stack={n_stack} contradicts the observation's bounds: they would repeat "
                f"those of one frame of {_values(size // n_stack)}, but low/high show at most "
                f"{largest} frames of {_values(size // largest)} (n_stack can be "
                f"{', '.join(map(str, allowed))}); pass the n_stack given to VecFrameStack, or "
                "build the kwargs with sequence_extractor_kwargs(env, ...)"
            )
        return n_stack, size // n_stack


def _values(count: int) -> str:
    return f"{count} value" if count == 1 else f"{count} values"


def stack_sizes_allowed_by_bounds(box: spaces.Box) -> list[int]:
    """The numbers of frames ``n_stack`` that a flat Box's low/high bounds allow, ascending.

    A stack of K frames of n values repeats the bounds of one frame: tiled, ``[l, l, ..]``
    (frames laid out oldest first, as gymnasium's ``FrameStackObservation`` and the data
    themselves), or each bound repeated K times in place, ``[l_1 × K, l_2 × K, ..]``, which is
    what Stable-Baselines3's ``VecFrameStack`` builds (``np.repeat``) although its observations
    are tiled. A K is allowed when the bounds have either form. Where the bounds are the same
    for every feature (``-inf..inf``) every divisor of the size is allowed: the frame size
    cannot be told from the space, and ``n_stack`` must come from the environment.

    :param box: a Box of shape ``(size,)``
    :return: the divisors K of ``size`` (1 always among them) the bounds allow
    """
    size = box.shape[0]
    bounds = np.stack([np.asarray(box.low).ravel(), np.asarray(box.high).ravel()])
    allowed = []
    for frames in range(1, size + 1):
        if size % frames:
            continue
        tiled = bounds.reshape(2, frames, size // frames)
        repeated = bounds.reshape(2, size // frames, frames)
        if (tiled == tiled[:, :1]).all() or (repeated == repeated[:, :, :1]).all():
            allowed.append(frames)
    return allowed


def sequence_extractor_kwargs(
    env: VecEnv | gym.Env,
    *,
    cell: str = "cfc",
    hidden_size: Any = 64,
    n_stack: int | None = None,
    **cell_kwargs: Any,
) -> dict[str, Any]:
    """The ``features_extractor_kwargs`` of :class:`SequenceExtractor` for ``env``, with
    ``n_stack`` read from its ``VecFrameStack``, so that it is not written twice::

        policy_kwargs = dict(
            features_extractor_class=SequenceExtractor,
            features_extractor_kwargs=sequence_extractor_kwargs(env, cell="cfc", hidden_size=64),
        )

    The VecEnv wrappers are walked from the outside in; the outermost ``VecFrameStack`` (the
    layout the policy sees) gives ``n_stack``. The kwargs are checked against ``env``'s
    observation space here, so a layout the extractor cannot read fails now, not when the
    model is built.

    :param env: the environment the model trains on (a VecEnv, or a Gymnasium env)
    :param cell: a name of :data:`cfc_rl.nn.CELLS`
    :param hidden_size: hidden units of the cell (or a wiring, for CfC and LTC)
    :param n_stack: the number of stacked frames; None reads it from the ``VecFrameStack``
        (none is needed for a ``HistoryWindow`` observation)
    :param cell_kwargs: passed to the cell (e.g. ``backbone_units=64``, ``solver="rk4"``)
    :return: ``dict(cell=..., hidden_size=..., n_stack=..., **cell_kwargs)`` (no ``n_stack``
        where neither it nor a ``VecFrameStack`` is given)
    :raises ValueError: where a given ``n_stack`` differs from the ``VecFrameStack``'s, or
        the observation space cannot be read with it
    """
    frame_stack = _outermost_frame_stack(env)
    if frame_stack is not None:
        stacked = frame_stack.stacked_obs.n_stack
        if n_stack is not None and n_stack != stacked:
            raise ValueError(
                f"n_stack={n_stack} but the environment's VecFrameStack stacks {stacked} frames; "
                "leave n_stack out to take it from the environment"
            )
        n_stack = stacked
    try:
        WindowLayout.from_space(env.observation_space, n_stack)
    except ValueError as error:
        if n_stack is not None or frame_stack is not None:
            raise
        raise ValueError(
            f"found no VecFrameStack among the wrappers of {type(env).__name__} to read n_stack "
            f"from: {error}"
        ) from None
    kwargs: dict[str, Any] = {"cell": cell, "hidden_size": hidden_size}
    if n_stack is not None:
        kwargs["n_stack"] = n_stack
    return {**kwargs, **cell_kwargs}


def _outermost_frame_stack(env: VecEnv | gym.Env) -> VecFrameStack | None:
    while isinstance(env, VecEnvWrapper):
        if isinstance(env, VecFrameStack):
            return env
        env = env.venv
    return None


class SequenceExtractor(BaseFeaturesExtractor):
    """Run a recurrent cell over a window of past observations; the features are its last output.

    Works with every SB3 algorithm (``policy_kwargs=dict(features_extractor_class=
    SequenceExtractor, features_extractor_kwargs=dict(cell="cfc", n_stack=4))``, or
    ``features_extractor_kwargs=sequence_extractor_kwargs(env, cell="cfc")``, which reads
    ``n_stack`` from the environment's ``VecFrameStack``) on:

    - SB3's ``VecFrameStack`` layout: a flat Box of ``n_stack`` frames, oldest first. A flat
      vector does not say where one frame ends, so ``n_stack`` must be given and must be the
      ``VecFrameStack``'s: it must divide the size, and where the bounds differ across
      features it must agree with them (:func:`stack_sizes_allowed_by_bounds`; e.g. a stack
      of 4 frames of 2 values read with ``n_stack=8`` is an error). Bounds that are the same
      everywhere cannot tell 4 frames of 2 values from 8 of 1: take ``n_stack`` from the
      environment with :func:`sequence_extractor_kwargs`;
    - the ``HistoryWindow`` layout of :mod:`cfc_rl.envs`: a Dict with ``"obs"`` (K, n),
      ``"dt"`` (K, 1), the elapsed time of each frame, and ``"valid"`` (K, 1), 0 for the
      padding before an episode's first step (use ``MultiInputPolicy``).

    Δt goes to continuous-time cells as ``timespans``; cells without a notion of time (LSTM,
    GRU) get it as an extra input feature, so that every cell sees the same information
    (:func:`cfc_rl.nn.time_input` decides). The state is reset at the first real frame, so
    padding is never fed as data.

    With PPO or A2C, pass ``ortho_init=False`` in ``policy_kwargs``: SB3's orthogonal
    initialisation (on by default) re-initialises every ``nn.Linear`` of the features
    extractor, the cell's included, replacing the cell's own initialisation.

    :param observation_space: the observation space (see the layouts above)
    :param cell: a name of :data:`cfc_rl.nn.CELLS` ("cfc", "ltc", "lstm", ...)
    :param hidden_size: hidden units of the cell (or a wiring, for CfC and LTC)
    :param n_stack: frames per observation in a flat layout (the ``VecFrameStack``'s);
        inferred from a (K, n) "obs"
    :param cell_kwargs: passed to the cell (e.g. ``backbone_units=64``, ``solver="rk4"``)
    """

    def __init__(
        self,
        observation_space: spaces.Space,
        *,
        cell: str = "cfc",
        hidden_size: Any = 64,
        n_stack: int | None = None,
        **cell_kwargs: Any,
    ) -> None:
        layout = WindowLayout.from_space(observation_space, n_stack)
        input_size = cell_input_size(cell, layout.features, layout.has_dt)
        module = make_cell(cell, input_size, hidden_size, **cell_kwargs)
        super().__init__(observation_space, features_dim=module.output_size)
        self.layout = layout
        self.cell = module

    def forward(self, observations: Tensor | dict[str, Tensor]) -> Tensor:
        layout = self.layout
        if isinstance(observations, dict):
            obs = observations[OBS_KEY]
            batch = obs.shape[0]
            x = obs.reshape(batch, layout.frames, layout.features)
            dt = observations[DT_KEY].reshape(batch, layout.frames) if layout.has_dt else None
            valid = (
                observations[VALID_KEY].reshape(batch, layout.frames) > 0.5
                if layout.has_valid
                else None
            )
        else:
            batch = observations.shape[0]
            x = observations.reshape(batch, layout.frames, layout.features)
            dt = valid = None
        resets = None
        if valid is not None:
            # Zero the state at the first real frame, so the padding before it leaves no trace.
            previous = torch.cat([torch.zeros_like(valid[:, :1]), valid[:, :-1]], dim=1)
            resets = valid & ~previous
        x, timespans = time_input(self.cell, x, dt)
        y, _ = self.cell(x, timespans=timespans, resets=resets)
        return y[:, -1]


class ElapsedTimeExtractor(BaseFeaturesExtractor):
    """Flatten a Dict observation and append its elapsed time Δt as the last feature.

    :class:`RecurrentCellPolicy` picks this extractor for Dict observations with a ``"dt"``
    entry and passes the last feature to its cell as ``timespans`` (or, for LSTM/GRU, as an
    input). Δt is read as it is: normalise only the other entries
    (``VecNormalize(venv, norm_obs_keys=["obs"])``).

    :param observation_space: a Dict space with a ``time_key`` entry of one element
    :param time_key: the key of the elapsed time
    """

    def __init__(self, observation_space: spaces.Dict, time_key: str = DT_KEY) -> None:
        if (
            not isinstance(observation_space, spaces.Dict)
            or time_key not in observation_space.spaces
        ):
            raise ValueError(
                f"ElapsedTimeExtractor needs a Dict observation with a {time_key!r} entry, "
                f"got {observation_space}"
            )
        if spaces.flatdim(observation_space[time_key]) != 1:
            raise ValueError(
                f"{time_key!r} must hold one number, got shape {observation_space[time_key].shape}"
            )
        self.keys = sorted(key for key in observation_space.spaces if key != time_key)
        size = sum(spaces.flatdim(observation_space[key]) for key in self.keys)
        super().__init__(observation_space, features_dim=size + 1)
        self.time_key = time_key

    def forward(self, observations: dict[str, Tensor]) -> Tensor:
        parts = [observations[key].flatten(start_dim=1) for key in self.keys]
        parts.append(observations[self.time_key].reshape(-1, 1))
        return torch.cat(parts, dim=1)


def default_extractor_class(observation_space: spaces.Space) -> type[BaseFeaturesExtractor]:
    """The features extractor the recurrent policies use unless given one: an
    :class:`ElapsedTimeExtractor` for Dict observations that report Δt (``"dt"``), SB3's
    ``CombinedExtractor`` for other Dicts, ``FlattenExtractor`` otherwise."""
    if isinstance(observation_space, spaces.Dict):
        return ElapsedTimeExtractor if DT_KEY in observation_space.spaces else CombinedExtractor
    return FlattenExtractor
