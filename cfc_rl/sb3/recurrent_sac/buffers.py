"""Replay buffers that sample sequences of transitions within one episode, for RecurrentSAC.

They are SB3's ``ReplayBuffer`` and ``DictReplayBuffer`` (same ring of ``buffer_size``
transitions, same storage arrays, same ``add``, same normalisation by a ``VecNormalize`` at
sample time, same ``handle_timeout_termination``) with two more arrays that say which stored
transitions follow each other in one episode: an episode id per transition and environment,
and the index of the ``add`` call that wrote each row. A sampled sequence reads only positions
of its own episode whose rows still hold it; everything else (earlier or later episodes, the
ring's head, rows not yet written) is padding, zero in the batch and flagged invalid.

Layout of one sampled sequence, anchored at stored transition ``t`` (R2D2's burn-in)::

    inputs:   obs_{t-K} .. obs_{t-1} | obs_t | next_obs_t .. next_obs_{t+L-1}    K + 1 + L
    actions, rewards, dones:                   transitions t .. t+L-1             L

Since a sequence never leaves its episode, ``next_obs_s`` is ``obs_{s+1}`` inside the episode
and the true last observation at its end (SB3 stores ``terminal_observation``), so one run of
a cell over the inputs gives the current values (positions ``K .. K+L-1``) and the targets
(positions ``K+1 .. K+L``) of every transition, episode ends and truncations included.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import torch
from gymnasium import spaces
from stable_baselines3.common.buffers import DictReplayBuffer, ReplayBuffer
from stable_baselines3.common.vec_env import VecNormalize
from torch import Tensor

from cfc_rl.sb3.extractors import DT_KEY

__all__ = ["DictSequenceReplayBuffer", "SequenceReplayBuffer", "SequenceReplayBufferSamples"]


class SequenceReplayBufferSamples(NamedTuple):
    """A batch of ``B`` sequences of ``L`` transitions, each after a burn-in of ``K`` steps.

    :param observations: the cells' inputs ``(B, K + 1 + L, *obs_shape)`` (a dict of them for
        Dict observations): ``obs`` of the K burn-in steps and of the first transition, then
        ``next_obs`` of the L transitions; zeros where invalid. Normalised by the
        ``VecNormalize`` given to ``sample`` (never the raw keys, such as Δt)
    :param actions: ``(B, L, action_dim)``, the stored (scaled) actions
    :param rewards: ``(B, L)``, normalised as the observations
    :param dones: ``(B, L)``, 1.0 where the episode terminated after the transition (no
        bootstrap); time-limit truncations count as not done when the buffer handles timeouts
    :param valid: ``(B, K + 1 + L)`` bool, the input positions that hold data of the sequence's
        episode (contiguous, always True at position K, the first transition)
    :param mask: ``(B, L)`` bool, the transitions that count in the losses (``valid[:, K+1:]``)
    :param burn_in: K
    """

    observations: Tensor | dict[str, Tensor]
    actions: Tensor
    rewards: Tensor
    dones: Tensor
    valid: Tensor
    mask: Tensor
    burn_in: int


class _SequenceSampling:
    """What both sequence buffers add to SB3's: episode bookkeeping and sequence sampling.

    Mixed in before ``ReplayBuffer``/``DictReplayBuffer`` (whose storage it reads)."""

    # Set by ReplayBuffer / DictReplayBuffer:
    buffer_size: int
    n_envs: int
    pos: int
    full: bool
    observations: Any
    next_observations: Any
    actions: np.ndarray
    rewards: np.ndarray
    dones: np.ndarray
    timeouts: np.ndarray
    device: torch.device

    def __init__(
        self,
        buffer_size: int,
        observation_space: spaces.Space,
        action_space: spaces.Space,
        device: torch.device | str = "auto",
        n_envs: int = 1,
        optimize_memory_usage: bool = False,
        handle_timeout_termination: bool = True,
        sequence_length: int = 32,
        burn_in: int = 8,
    ) -> None:
        if optimize_memory_usage:
            raise ValueError(
                f"{type(self).__name__} does not support optimize_memory_usage=True: the "
                "sequences read the stored next observations"
            )
        if sequence_length < 1:
            raise ValueError(f"sequence_length must be >= 1, got {sequence_length}")
        if burn_in < 0:
            raise ValueError(f"burn_in must be >= 0, got {burn_in}")
        super().__init__(  # type: ignore[call-arg]  # the SB3 buffer after this class
            buffer_size,
            observation_space,
            action_space,
            device=device,
            n_envs=n_envs,
            optimize_memory_usage=False,
            handle_timeout_termination=handle_timeout_termination,
        )
        self.sequence_length = int(sequence_length)
        self.burn_in = int(burn_in)
        # The episode of each stored transition (ids are never reused, -1: not written) and the
        # number of the add() call that wrote each row (-1: not written). Two rows follow each
        # other in an episode when their ids match and their add numbers are consecutive: this
        # also rejects the jump from the newest row to the oldest at the ring's head, even
        # inside an episode longer than the buffer.
        self.episode_ids = np.full((self.buffer_size, self.n_envs), -1, dtype=np.int64)
        self.add_numbers = np.full((self.buffer_size,), -1, dtype=np.int64)
        self._episode_of_env = np.arange(self.n_envs, dtype=np.int64)
        self._next_episode_id = self.n_envs
        self._adds = 0

    def start_new_episodes(self, env_indices: np.ndarray | list[int] | None = None) -> None:
        """Give the next transitions of these environments (all when None) a new episode id.

        ``add`` does it after every ``done``; call it where an environment is reset without a
        ``done`` (RecurrentSAC does at the start of ``learn``), so that a sequence does not
        join the end of one episode to the start of the next.
        """
        indices = np.arange(self.n_envs) if env_indices is None else np.asarray(env_indices)
        count = len(indices)
        self._episode_of_env[indices] = self._next_episode_id + np.arange(count)
        self._next_episode_id += count

    def reset(self) -> None:
        super().reset()  # type: ignore[misc]
        self.episode_ids.fill(-1)
        self.add_numbers.fill(-1)
        self.start_new_episodes()

    def add(self, *args: Any, **kwargs: Any) -> None:
        row = self.pos  # ReplayBuffer.add writes this row, then moves pos
        self.episode_ids[row] = self._episode_of_env
        self.add_numbers[row] = self._adds
        super().add(*args, **kwargs)  # type: ignore[misc]
        self._adds += 1
        done = kwargs["done"] if "done" in kwargs else args[4]
        ended = np.flatnonzero(np.asarray(done).reshape(self.n_envs))
        if len(ended):
            self.start_new_episodes(ended)

    def sample(  # type: ignore[override]
        self, batch_size: int, env: VecNormalize | None = None
    ) -> SequenceReplayBufferSamples:
        """Sample ``batch_size`` sequences: anchors (first transitions) uniform over the stored
        transitions of every environment, as SB3 samples single transitions.

        A transition near the end of its episode anchors a sequence that is mostly padding;
        one near the start is covered by fewer sequences than later ones.

        :param batch_size: the number of sequences (each has up to ``sequence_length``
            transitions that count in the losses)
        :param env: a ``VecNormalize`` to normalise observations and rewards with
        """
        upper = self.buffer_size if self.full else self.pos
        if upper == 0:
            raise ValueError("cannot sample from an empty replay buffer")
        rows = np.random.randint(0, upper, size=batch_size)
        env_indices = np.random.randint(0, self.n_envs, size=batch_size)
        return self.get_sequences(rows, env_indices, env=env)

    def _get_samples(  # type: ignore[override]
        self, batch_inds: np.ndarray, env: VecNormalize | None = None
    ) -> SequenceReplayBufferSamples:
        env_indices = np.random.randint(0, self.n_envs, size=len(batch_inds))
        return self.get_sequences(batch_inds, env_indices, env=env)

    def sequence_validity(self, rows: np.ndarray, env_indices: np.ndarray) -> np.ndarray:
        """Which transitions ``t-K .. t+L-1`` around each anchor ``t = rows[i]`` (of
        environment ``env_indices[i]``) are stored transitions of the anchor's episode.

        :return: ``(B, K + L)`` bool; column K (the anchor) is always True
        """
        rows = np.asarray(rows, dtype=np.int64)
        env_indices = np.asarray(env_indices, dtype=np.int64)
        offsets = np.arange(-self.burn_in, self.sequence_length)
        around = (rows[:, None] + offsets) % self.buffer_size
        episode = self.episode_ids[rows, env_indices]
        if (episode < 0).any():
            raise ValueError("an anchor row of the sample holds no stored transition")
        same_episode = self.episode_ids[around, env_indices[:, None]] == episode[:, None]
        consecutive = self.add_numbers[around] == self.add_numbers[rows][:, None] + offsets
        return same_episode & consecutive

    def get_sequences(
        self, rows: np.ndarray, env_indices: np.ndarray, env: VecNormalize | None = None
    ) -> SequenceReplayBufferSamples:
        """The sequences anchored at stored transitions ``rows`` of environments
        ``env_indices`` (see :class:`SequenceReplayBufferSamples` for the layout).

        :param rows: ``(B,)`` rows of the ring holding the first transition of each sequence
        :param env_indices: ``(B,)`` the environment of each sequence
        :param env: a ``VecNormalize`` to normalise observations and rewards with
        """
        rows = np.asarray(rows, dtype=np.int64)
        env_indices = np.asarray(env_indices, dtype=np.int64)
        burn_in = self.burn_in
        transitions = self.sequence_validity(rows, env_indices)  # (B, K + L)
        around = (rows[:, None] + np.arange(-burn_in, self.sequence_length)) % self.buffer_size
        envs = env_indices[:, None]
        # Inputs: obs of transitions t-K..t, then next_obs of t..t+L-1.
        obs_rows, next_rows = around[:, : burn_in + 1], around[:, burn_in:]
        valid = np.concatenate([transitions[:, : burn_in + 1], transitions[:, burn_in:]], axis=1)
        mask = transitions[:, burn_in:]

        def gather(storage: np.ndarray, next_storage: np.ndarray) -> np.ndarray:
            return np.concatenate([storage[obs_rows, envs], next_storage[next_rows, envs]], axis=1)

        observations = self._normalize_obs(self._gather_observations(gather), env)
        actions = self.actions[next_rows, envs]
        rewards = self._normalize_reward(self.rewards[next_rows, envs], env)
        dones = self.dones[next_rows, envs] * (1 - self.timeouts[next_rows, envs])
        # Padding is whatever the storage holds there (other episodes, zeros, anything): it is
        # replaced by zeros here, and the policy masks it again before every cell and loss.
        observations = _where_valid(observations, valid)
        return SequenceReplayBufferSamples(
            observations=_to_torch(observations, self.device),
            actions=_to_torch(_where_valid(actions, mask), self.device),
            rewards=_to_torch(_where_valid(rewards.astype(np.float32), mask), self.device),
            dones=_to_torch(_where_valid(dones.astype(np.float32), mask), self.device),
            valid=torch.as_tensor(valid, device=self.device),
            mask=torch.as_tensor(mask, device=self.device),
            burn_in=burn_in,
        )

    def _gather_observations(self, gather: Any) -> np.ndarray | dict[str, np.ndarray]:
        return gather(self.observations, self.next_observations)


def _where_valid(values: Any, valid: np.ndarray) -> Any:
    """``values`` (an array or a dict of arrays of shape ``(B, T, ...)``) with zeros where
    ``valid (B, T)`` is False: ``np.where``, so that NaN or inf there does not survive."""
    if isinstance(values, dict):
        return {key: _where_valid(value, valid) for key, value in values.items()}
    keep = valid.reshape(valid.shape + (1,) * (values.ndim - valid.ndim))
    return np.where(keep, values, np.zeros((), dtype=values.dtype))


def _to_torch(values: Any, device: torch.device) -> Any:
    if isinstance(values, dict):
        return {key: _to_torch(value, device) for key, value in values.items()}
    return torch.as_tensor(np.ascontiguousarray(values), device=device)


class SequenceReplayBuffer(_SequenceSampling, ReplayBuffer):
    """SB3's ``ReplayBuffer`` that samples sequences within one episode, with a burn-in.

    Memory is SB3's: ``buffer_size`` transitions in all (``buffer_size // n_envs`` rows of
    ``n_envs``), a ring that overwrites the oldest; plus two integers per transition.
    ``sample(batch_size)`` returns ``batch_size`` *sequences* (see
    :class:`SequenceReplayBufferSamples`).

    :param buffer_size: the most transitions kept (all environments together)
    :param observation_space: observation space
    :param action_space: action space
    :param device: where the sampled tensors go
    :param n_envs: number of parallel environments
    :param optimize_memory_usage: must be False (next observations are needed as stored)
    :param handle_timeout_termination: time-limit truncations bootstrap (SB3's meaning)
    :param sequence_length: L, the transitions of a sequence that count in the losses
    :param burn_in: K, earlier steps of the same episode that only warm up the cells' state
    """


class DictSequenceReplayBuffer(_SequenceSampling, DictReplayBuffer):
    """:class:`SequenceReplayBuffer` for Dict observations (SB3's ``DictReplayBuffer``).

    The ``raw_obs_keys`` (default: Δt, ``"dt"``) are never normalised at sample time, even by a
    ``VecNormalize`` that normalises every key: the cells read Δt as elapsed seconds.

    :param raw_obs_keys: observation keys returned as stored
    The other parameters are those of :class:`SequenceReplayBuffer`.
    """

    def __init__(
        self, *args: Any, raw_obs_keys: tuple[str, ...] = (DT_KEY,), **kwargs: Any
    ) -> None:
        self.raw_obs_keys = tuple(raw_obs_keys)
        super().__init__(*args, **kwargs)

    def _gather_observations(self, gather: Any) -> dict[str, np.ndarray]:
        return {
            key: gather(self.observations[key], self.next_observations[key])
            for key in self.observations
        }

    def _normalize_obs(  # type: ignore[override]
        self, obs: dict[str, np.ndarray], env: VecNormalize | None = None
    ) -> dict[str, np.ndarray]:
        if env is None:
            return obs
        normalized = dict(env.normalize_obs(obs))
        for key in self.raw_obs_keys:
            if key in obs:
                normalized[key] = obs[key]
        return normalized
