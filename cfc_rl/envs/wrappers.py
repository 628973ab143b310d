"""Wrappers that make any Gymnasium environment partially observable or irregularly timed.

Observation wrappers (:class:`MaskObservation`, :class:`SensorNoise`, :class:`SensorDropout`,
:class:`Flicker`) act on a :class:`~gymnasium.spaces.Box` observation, or on the ``"obs"`` entry
of a :class:`~gymnasium.spaces.Dict` observation such as the one :class:`IrregularTime` returns;
they never touch ``"dt"``, so the elapsed time reaches a policy exactly.

Randomness: each random wrapper owns a generator that ``reset(seed=s)`` re-seeds from ``s`` (and
the wrapper's class name, so that flicker and drop-out do not draw the same numbers). It is not
Gymnasium's ``Wrapper.np_random``, which is the *base* environment's generator: drawing from it
would shift the base environment's own random stream (its initial states), so that adding a
wrapper would change the physics. Same seed → same trajectory, repeats, flicker, noise and
drop-out; resets without a seed continue the stream, as Gymnasium environments do.
"""

from __future__ import annotations

import math
import numbers
import zlib
from collections.abc import Sequence
from typing import Any, SupportsFloat

import gymnasium as gym
import numpy as np
from gymnasium import spaces

__all__ = [
    "DT_KEY",
    "OBS_KEY",
    "VALID_KEY",
    "Flicker",
    "HistoryWindow",
    "IrregularTime",
    "MaskObservation",
    "ObservationPartWrapper",
    "SensorDropout",
    "SensorNoise",
    "TimeInfo",
    "base_dt",
]

OBS_KEY = "obs"
"""Key of the sensor reading in the Dict observations of IrregularTime and HistoryWindow."""
DT_KEY = "dt"
"""Key of the elapsed time in seconds, in Dict observations and in ``info``."""
VALID_KEY = "valid"
"""Key of :class:`HistoryWindow`'s "this frame is real" flag (0 for padding before the episode)."""


# ---------------------------------------------------------------------------------------------
# Argument checks, shared with the registry and the YAML loader so that every entry point gives
# the same message for the same mistake.
# ---------------------------------------------------------------------------------------------


def _is_real(value: Any) -> bool:
    # bool is an int subclass; `flicker=True` is a mistake, not a probability of 1.
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_probability(name: str, value: Any) -> float:
    """Return ``value`` as a float, or raise a ValueError naming ``name`` unless it is in [0, 1].

    :param name: the argument name to put in the message
    :param value: the value to check
    :return: ``float(value)``
    """
    if not _is_real(value) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {value!r}")
    return float(value)


def check_nonnegative(name: str, value: Any) -> float:
    """Return ``value`` as a float, or raise a ValueError naming ``name`` unless finite and >= 0.

    :param name: the argument name to put in the message
    :param value: the value to check
    :return: ``float(value)``
    """
    if not _is_real(value) or not math.isfinite(float(value)) or float(value) < 0.0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def check_positive_int(name: str, value: Any) -> int:
    """Return ``value`` as an int, or raise a ValueError naming ``name`` unless an integer >= 1.

    :param name: the argument name to put in the message
    :param value: the value to check
    :return: ``int(value)``
    """
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def check_repeat_range(name: str, value: Any) -> tuple[int, int]:
    """Check an ``irregular=(min_repeat, max_repeat)`` pair.

    :param name: the argument name to put in the message
    :param value: a sequence of two integers ``1 <= min_repeat <= max_repeat``
    :return: the pair as a tuple of ints
    """
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 2:
        raise ValueError(f"{name} must be a pair (min_repeat, max_repeat), got {value!r}")
    lo = check_positive_int(f"{name}: min_repeat", value[0])
    hi = check_positive_int(f"{name}: max_repeat", value[1])
    if lo > hi:
        raise ValueError(f"{name}: min_repeat ({lo}) must be <= max_repeat ({hi})")
    return lo, hi


def base_dt(env: gym.Env) -> float:
    """Seconds that one step of the unwrapped environment lasts.

    MuJoCo environments and Pendulum expose ``dt``, CartPole ``tau``; environments with neither
    (MountainCar, for example) count time in steps, so one step is 1.0.

    :param env: any Gymnasium environment, wrapped or not
    :return: the duration of one base step, in seconds
    """
    unwrapped = env.unwrapped
    for name in ("dt", "tau"):
        value = getattr(unwrapped, name, None)
        if _is_real(value) and math.isfinite(float(value)) and float(value) > 0.0:
            return float(value)
    return 1.0


def _observation_box(space: spaces.Space, owner: str) -> spaces.Box:
    """The Box a wrapper acts on: the space itself or a Dict's "obs" entry."""
    if isinstance(space, spaces.Box):
        return space
    if isinstance(space, spaces.Dict) and isinstance(space.spaces.get(OBS_KEY), spaces.Box):
        return space.spaces[OBS_KEY]
    raise TypeError(
        f"{owner} needs a Box observation space or a Dict with a Box under {OBS_KEY!r}, got {space}"
    )


def _bounds_with_zero(box: spaces.Box) -> tuple[np.ndarray, np.ndarray]:
    """Box bounds widened so that an all-zero (blanked or padded) reading lies inside."""
    return np.minimum(box.low, 0).astype(box.dtype), np.maximum(box.high, 0).astype(box.dtype)


class _OwnRandomness:
    """A generator owned by the wrapper and re-seeded by ``reset(seed=...)``."""

    _rng: np.random.Generator | None = None

    def _reseed(self, seed: int | None) -> None:
        if seed is not None:
            # The class name in the spawn key gives each kind of wrapper its own stream.
            key = zlib.crc32(type(self).__name__.encode())
            self._rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(key,)))

    @property
    def rng(self) -> np.random.Generator:
        """The wrapper's generator (fresh entropy until the first seeded reset)."""
        if self._rng is None:
            self._rng = np.random.default_rng()
        return self._rng


class ObservationPartWrapper(_OwnRandomness, gym.ObservationWrapper):
    """Base class: apply :meth:`transform` to the observation part of a Box or Dict observation.

    Subclasses implement :meth:`transform` (an array in, a new array out) and, when the values
    can leave the original bounds, :meth:`transform_space`. On a Dict observation only the
    ``"obs"`` entry changes; every other entry (``"dt"`` in particular) passes through as is.

    :param env: the environment to wrap
    """

    def __init__(self, env: gym.Env) -> None:
        gym.ObservationWrapper.__init__(self, env)
        space = env.observation_space
        box = _observation_box(space, type(self).__name__)
        self._in_dict = isinstance(space, spaces.Dict)
        new_box = self.transform_space(box)
        if self._in_dict:
            self.observation_space = spaces.Dict({**space.spaces, OBS_KEY: new_box})
        else:
            self.observation_space = new_box

    def transform_space(self, box: spaces.Box) -> spaces.Box:
        """The space of the transformed part (default: unchanged).

        :param box: the space of the part before the transformation
        :return: the space after it
        """
        return box

    def transform(self, obs: np.ndarray) -> np.ndarray:
        """Transform the observation part.

        :param obs: the part (never modified in place)
        :return: a new array in :meth:`transform_space`
        """
        raise NotImplementedError

    def observation(self, observation: Any) -> Any:
        """Apply :meth:`transform` to the Box observation or to the Dict's ``"obs"`` entry.

        :param observation: the inner environment's observation
        :return: the transformed observation
        """
        if self._in_dict:
            out = dict(observation)
            out[OBS_KEY] = self.transform(observation[OBS_KEY])
            return out
        return self.transform(observation)

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[Any, dict[str, Any]]:
        """Reset the environment, re-seeding this wrapper's generator when ``seed`` is given."""
        self._reseed(seed)
        return super().reset(seed=seed, options=options)


class MaskObservation(ObservationPartWrapper, gym.utils.RecordConstructorArgs):
    """Keep only some entries of a 1-D observation; the others are removed, not zeroed.

    :param env: the environment to wrap (a 1-D Box observation, or a Dict with one under "obs")
    :param indices: the entries to keep, in the order they should appear
    """

    def __init__(self, env: gym.Env, indices: Sequence[int]) -> None:
        gym.utils.RecordConstructorArgs.__init__(self, indices=tuple(indices))
        box = _observation_box(env.observation_space, "MaskObservation")
        if len(box.shape) != 1:
            raise ValueError(f"MaskObservation needs a 1-D observation, got shape {box.shape}")
        idx = [int(i) for i in indices]
        if not idx:
            raise ValueError("indices must not be empty")
        bad = [i for i in idx if not 0 <= i < box.shape[0]]
        if bad:
            raise ValueError(
                f"indices {bad} are out of range for an observation of size {box.shape[0]}"
            )
        if len(set(idx)) != len(idx):
            raise ValueError(f"indices must not repeat, got {idx}")
        self.indices = np.asarray(idx, dtype=np.intp)
        super().__init__(env)

    def transform_space(self, box: spaces.Box) -> spaces.Box:
        return spaces.Box(box.low[self.indices], box.high[self.indices], dtype=box.dtype)

    def transform(self, obs: np.ndarray) -> np.ndarray:
        # Fancy indexing copies, so the caller never shares memory with the inner env.
        return obs[self.indices]


class SensorNoise(ObservationPartWrapper, gym.utils.RecordConstructorArgs):
    """Add zero-mean Gaussian noise with standard deviation ``sigma`` to every entry.

    ``sigma`` is in the observation's own units. A noisy reading can leave the physical bounds,
    so with ``sigma > 0`` the observation space becomes unbounded rather than clipped (clipping
    would bias the noise).

    :param env: the environment to wrap (float observations)
    :param sigma: the noise standard deviation, >= 0
    """

    def __init__(self, env: gym.Env, sigma: float) -> None:
        gym.utils.RecordConstructorArgs.__init__(self, sigma=sigma)
        self.sigma = check_nonnegative("sigma", sigma)
        box = _observation_box(env.observation_space, "SensorNoise")
        if not np.issubdtype(box.dtype, np.floating):
            raise TypeError(f"SensorNoise needs a float observation, got dtype {box.dtype}")
        super().__init__(env)

    def transform_space(self, box: spaces.Box) -> spaces.Box:
        if self.sigma == 0.0:
            return box
        return spaces.Box(-np.inf, np.inf, shape=box.shape, dtype=box.dtype)

    def transform(self, obs: np.ndarray) -> np.ndarray:
        noise = self.rng.normal(0.0, self.sigma, size=obs.shape)
        return (obs + noise).astype(obs.dtype, copy=False)


class SensorDropout(ObservationPartWrapper, gym.utils.RecordConstructorArgs):
    """Each entry reads zero, independently, with probability ``p`` (a dead sensor).

    :param env: the environment to wrap
    :param p: the probability that one entry is dropped at one step, in [0, 1]
    """

    def __init__(self, env: gym.Env, p: float) -> None:
        gym.utils.RecordConstructorArgs.__init__(self, p=p)
        self.p = check_probability("p", p)
        super().__init__(env)

    def transform_space(self, box: spaces.Box) -> spaces.Box:
        return spaces.Box(*_bounds_with_zero(box), dtype=box.dtype)

    def transform(self, obs: np.ndarray) -> np.ndarray:
        dropped = self.rng.random(obs.shape) < self.p
        return np.where(dropped, np.zeros_like(obs), obs)


class Flicker(ObservationPartWrapper, gym.utils.RecordConstructorArgs):
    """The whole observation reads zero with probability ``p`` (the flickering-Atari protocol).

    :param env: the environment to wrap
    :param p: the probability that one observation is blanked, in [0, 1]
    """

    def __init__(self, env: gym.Env, p: float) -> None:
        gym.utils.RecordConstructorArgs.__init__(self, p=p)
        self.p = check_probability("p", p)
        super().__init__(env)

    def transform_space(self, box: spaces.Box) -> spaces.Box:
        return spaces.Box(*_bounds_with_zero(box), dtype=box.dtype)

    def transform(self, obs: np.ndarray) -> np.ndarray:
        if self.rng.random() < self.p:
            return np.zeros_like(obs)
        return obs.copy()


class TimeInfo(gym.Wrapper, gym.utils.RecordConstructorArgs):
    """Report the elapsed seconds of every step as ``info["dt"]`` (a float).

    The reset info carries ``dt`` too: the nominal interval that the first observation stands
    for (one base step; see :class:`HistoryWindow` for why not 0). A ``dt`` already in ``info``
    (set by an inner :class:`IrregularTime`) is left as it is.

    :param env: the environment to wrap
    :param dt: seconds per step; ``None`` reads it from the environment (:func:`base_dt`)
    """

    def __init__(self, env: gym.Env, dt: float | None = None) -> None:
        gym.utils.RecordConstructorArgs.__init__(self, dt=dt)
        gym.Wrapper.__init__(self, env)
        self.dt = base_dt(env) if dt is None else check_nonnegative("dt", dt)

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[Any, dict[str, Any]]:
        obs, info = self.env.reset(seed=seed, options=options)
        info = dict(info)
        info.setdefault(DT_KEY, self.dt)
        return obs, info

    def step(self, action: Any) -> tuple[Any, SupportsFloat, bool, bool, dict[str, Any]]:
        obs, reward, terminated, truncated, info = self.env.step(action)
        info = dict(info)
        info.setdefault(DT_KEY, self.dt)
        return obs, reward, terminated, truncated, info


class IrregularTime(_OwnRandomness, gym.Wrapper, gym.utils.RecordConstructorArgs):
    """Each control step repeats the action for k base steps, k uniform in [min_repeat, max_repeat].

    Rewards are summed over the k base steps; an episode that ends inside them ends the control
    step early (only the executed base steps count). The elapsed time reaches the policy in the
    observation, which becomes ``Dict({"obs": <inner space>, "dt": Box(0, inf, (1,), float32)})``
    so that ``VecNormalize(norm_obs_keys=["obs"])`` leaves ``dt`` unnormalised, and in
    ``info["dt"]`` (seconds, float); ``info["repeats"]`` is the number of base steps executed.
    Elapsed time is the sum of the inner ``info["dt"]`` when the inner env reports one, else
    k · :func:`base_dt`. After a reset, ``dt`` is one base step (see :class:`HistoryWindow`).

    Episode time limits of the inner env count base steps, i.e. simulated time, so an episode
    covers the same physical time whatever the repeats.

    :param env: the environment to wrap
    :param min_repeat: the fewest base steps per control step, >= 1
    :param max_repeat: the most base steps per control step, >= min_repeat
    """

    def __init__(self, env: gym.Env, min_repeat: int, max_repeat: int) -> None:
        gym.utils.RecordConstructorArgs.__init__(self, min_repeat=min_repeat, max_repeat=max_repeat)
        gym.Wrapper.__init__(self, env)
        self.min_repeat = check_positive_int("min_repeat", min_repeat)
        self.max_repeat = check_positive_int("max_repeat", max_repeat)
        if self.min_repeat > self.max_repeat:
            raise ValueError(
                f"min_repeat ({self.min_repeat}) must be <= max_repeat ({self.max_repeat})"
            )
        self.base_dt = base_dt(env)
        self.observation_space = spaces.Dict(
            {
                OBS_KEY: env.observation_space,
                DT_KEY: spaces.Box(0.0, np.inf, shape=(1,), dtype=np.float32),
            }
        )

    def _wrap(self, obs: Any, dt: float) -> dict[str, Any]:
        return {OBS_KEY: obs, DT_KEY: np.array([dt], dtype=np.float32)}

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        self._reseed(seed)
        obs, info = self.env.reset(seed=seed, options=options)
        info = dict(info)
        dt = float(info.get(DT_KEY, self.base_dt))
        info[DT_KEY] = dt
        return self._wrap(obs, dt), info

    def step(self, action: Any) -> tuple[dict[str, Any], float, bool, bool, dict[str, Any]]:
        k = int(self.rng.integers(self.min_repeat, self.max_repeat + 1))
        total_reward = 0.0
        dts: list[float] = []
        for _ in range(k):
            obs, reward, terminated, truncated, info = self.env.step(action)
            total_reward += float(reward)
            dts.append(float(info.get(DT_KEY, self.base_dt)))
            if terminated or truncated:
                break
        info = dict(info)
        info[DT_KEY] = math.fsum(dts)
        info["repeats"] = len(dts)
        return self._wrap(obs, info[DT_KEY]), total_reward, terminated, truncated, info


class HistoryWindow(gym.Wrapper, gym.utils.RecordConstructorArgs):
    """The last ``k`` frames, oldest first, each with its elapsed time and a "frame is real" flag.

    Observation: ``Dict({"obs": Box(k, *obs_shape), "dt": Box(0, inf, (k, 1), float32),
    "valid": Box(0, 1, (k, 1), float32)})``; row ``k - 1`` is the newest frame. Before the
    episode has ``k`` frames, the missing rows are zeros with ``dt = 0`` and ``valid = 0``.

    Δt of a frame comes from the inner Dict's ``"dt"`` (under :class:`IrregularTime`), otherwise
    from ``info["dt"]``, otherwise :func:`base_dt`. The reset frame gets one base step rather than
    0: a zero interval makes ODE cells such as LTC ignore the first observation (its fused
    solver even divides by it), while one nominal step treats it like any other reading.

    :param env: the environment to wrap (a Box observation, or a Dict of "obs" and "dt")
    :param k: the number of frames, >= 1
    """

    def __init__(self, env: gym.Env, k: int) -> None:
        gym.utils.RecordConstructorArgs.__init__(self, k=k)
        gym.Wrapper.__init__(self, env)
        self.k = check_positive_int("k", k)
        space = env.observation_space
        box = _observation_box(space, "HistoryWindow")
        if isinstance(space, spaces.Dict) and set(space.spaces) - {OBS_KEY, DT_KEY}:
            raise TypeError(
                f"HistoryWindow reads a Dict with keys {OBS_KEY!r} and {DT_KEY!r} only, "
                f"got {sorted(space.spaces)}"
            )
        self._dict_dt = isinstance(space, spaces.Dict) and DT_KEY in space.spaces
        self.base_dt = base_dt(env)
        low, high = _bounds_with_zero(box)
        shape = (self.k, *box.shape)
        self.observation_space = spaces.Dict(
            {
                OBS_KEY: spaces.Box(
                    np.broadcast_to(low, shape), np.broadcast_to(high, shape), dtype=box.dtype
                ),
                DT_KEY: spaces.Box(0.0, np.inf, shape=(self.k, 1), dtype=np.float32),
                VALID_KEY: spaces.Box(0.0, 1.0, shape=(self.k, 1), dtype=np.float32),
            }
        )
        self._obs = np.zeros(shape, dtype=box.dtype)
        self._dt = np.zeros((self.k, 1), dtype=np.float32)
        self._valid = np.zeros((self.k, 1), dtype=np.float32)

    def _push(self, observation: Any, info: dict[str, Any]) -> dict[str, np.ndarray]:
        if isinstance(observation, dict):
            obs = observation[OBS_KEY]
            dt = float(observation[DT_KEY][0]) if self._dict_dt else None
        else:
            obs, dt = observation, None
        if dt is None:
            dt = float(info.get(DT_KEY, self.base_dt))
        # Shift in place (oldest row falls out), then write the newest frame last.
        for buf in (self._obs, self._dt, self._valid):
            buf[:-1] = buf[1:]
        self._obs[-1] = obs
        self._dt[-1] = dt
        self._valid[-1] = 1.0
        # Copies: the caller keeps each observation while the buffers keep moving.
        return {OBS_KEY: self._obs.copy(), DT_KEY: self._dt.copy(), VALID_KEY: self._valid.copy()}

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        obs, info = self.env.reset(seed=seed, options=options)
        for buf in (self._obs, self._dt, self._valid):
            buf.fill(0)
        return self._push(obs, info), info

    def step(
        self, action: Any
    ) -> tuple[dict[str, np.ndarray], SupportsFloat, bool, bool, dict[str, Any]]:
        obs, reward, terminated, truncated, info = self.env.step(action)
        return self._push(obs, info), reward, terminated, truncated, info
