"""Export a trained run's policy as one self-contained file: ONNX or TorchScript.

``cfc-rl export RUN --format onnx`` writes ``RUN/policy.onnx`` and ``RUN/policy.onnx.json``
(``--format torchscript``: ``RUN/policy.pt`` and ``RUN/policy.pt.json``). The file computes one
control step::

    (obs, state, [dt], episode_start) -> (action, new_state)

for a batch of B robots (the batch size is free), with everything between the sensors and the
actuators inside it:

- ``obs`` ``(B, *obs_shape)``: the raw sensor values, as the task returns them (the dtype of
  its observation space). The run's VecNormalize statistics are folded in, frozen, and applied
  as VecNormalize does (``clip((obs - mean) / sqrt(var + eps), ±clip_obs)``, in float64, then
  float32), to the observation part only (``"obs"`` of a Dict observation; Δt stays raw).
- ``dt`` ``(B, 1)`` float32: the elapsed time of the step in seconds, only where the task
  reports it to the policy (irregular time: a Dict observation ``{"obs", "dt"}``, whose two
  pieces become the two inputs ``obs`` and ``dt``). Where the control period is fixed the
  module takes no Δt; one that needs it (a window's Δt) holds the period as a constant.
- ``episode_start`` ``(B,)`` float32: 1.0 where ``obs`` is the first observation of an episode
  (the state is then cleared before the step), else 0.0.
- ``state`` ``(B, state_size)``: all the memory the policy carries between steps, zeros at
  the start; feed ``new_state`` back at the next step. What it holds, by policy: the actor's
  cell state (RecurrentPPO with :class:`~cfc_rl.sb3.RecurrentCellPolicy`; RecurrentPPO only
  needs the actor's state for actions), ``h`` and ``c`` of the actor LSTM (sb3-contrib's
  ``MlpLstmPolicy``), the stacked normalised frames (``VecFrameStack``), the window of raw
  frames with their Δt and valid flags (a task with ``history``, for a
  :class:`~cfc_rl.sb3.SequenceExtractor`), nothing (size 0) for a memoryless MLP. The JSON
  gives its parts' names, offsets and shapes.
- ``action``: the deterministic action as ``model.predict(..., deterministic=True)`` returns
  it: the Gaussian mean clipped to the Box bounds (PPO), tanh-squashed and rescaled to them
  (SAC, and squashed gSDE), the argmax (Discrete, int64).

The state is float32, or float64 where raw float64 observations (MuJoCo) are kept in a window
or a stack of frames, so that they keep their precision. The TorchScript file loads with
``torch.jit.load`` alone (torch 2.13 deprecates TorchScript in favour of ``torch.export``; it
still writes and loads it); the ONNX file with any ONNX runtime.

The JSON beside the file (:func:`export_run` returns it, the command prints it) holds the
inputs and outputs, the state layout, the observation layout and normalisation, the action
space and its mapping, the control period (``base_dt × repeats`` where it is fixed, else "read
dt"), the task to build for a control loop (without the history window, which is in the
state) and the run's evaluation seed and protocol. ``scripts/onnx_control_loop.py`` drives a
task with an exported ONNX file and onnxruntime alone.

Tracing: the cells record their plain ATen path whenever a tracer runs
(:func:`cfc_rl.nn.base.tracing`), so the file computes what the eager fast paths compute;
:func:`export_run` checks this on the written file (a few steps, state carried, an episode
start in between) and refuses to leave a file that disagrees. ONNX needs
``pip install -e '.[export]'`` (onnx, onnxscript for torch's exporter, onnxruntime for the
check and for running it).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import json
import logging
import math
import os
import pickle
import re
import sys
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from cfc_rl.experiment.runs import RunError, RunFolder, atomic_write, atomic_write_text, load_model

if TYPE_CHECKING:  # imported where used: `cfc-rl --help` imports this module
    import numpy as np
    from gymnasium import spaces
    from torch import Tensor

    from cfc_rl.experiment.tasks import Task

# The keys of cfc_rl.envs (which imports Gymnasium): the observation, its Δt, a frame's flag.
OBS_KEY, DT_KEY, VALID_KEY = "obs", "dt", "valid"

__all__ = [
    "FORMATS",
    "ExportError",
    "RunParts",
    "add_export_arguments",
    "build_exported_policy",
    "default_output",
    "export_command",
    "export_run",
    "load_run_parts",
    "metadata_file",
]

logger = logging.getLogger(__name__)

FORMATS = {"onnx": ".onnx", "torchscript": ".pt"}
"""The formats and the suffix of their files."""
INSTALL_ONNX = "pip install -e '.[export]'"
CHECK_ATOL = 1e-4
"""Largest difference the check of a written file accepts against the eager policy (float32;
the tests hold the exported policies to 1e-5 against ``model.predict``)."""


class ExportError(RuntimeError):
    """A run that cannot be exported (a policy, space or layout the exporter does not know), a
    missing package, or a written file that does not compute what the policy computes; the
    message says what is missing or what to do."""


# The pieces of the exported step -----------------------------------------------------------


@dataclass(frozen=True)
class _Part:
    """One named block of the flat state: ``size`` numbers from ``offset``, read as ``shape``."""

    name: str
    offset: int
    shape: tuple[int, ...]
    holds: str

    @property
    def size(self) -> int:
        return math.prod(self.shape)


@functools.cache
def _torch_parts() -> SimpleNamespace:
    """The modules of the exported step, defined on first use: importing this module (for the
    command line's arguments) must not import torch, so that ``cfc-rl --help`` answers at once.
    :class:`ExportedPolicy` is the one to know; the others are its pieces."""
    import numpy as np
    import torch
    from gymnasium import spaces
    from torch import nn

    from cfc_rl.nn import time_input

    class _Normalizer(nn.Module):
        """VecNormalize's frozen ``clip((x - mean) / sqrt(var + eps), -clip, clip)`` in float64,
        then float32, as VecNormalize computes it in numpy."""

        def __init__(self, mean: np.ndarray, var: np.ndarray, epsilon: float, clip: float) -> None:
            super().__init__()
            self.register_buffer("mean", torch.as_tensor(np.asarray(mean, dtype=np.float64)))
            scale = np.sqrt(np.asarray(var, dtype=np.float64) + epsilon)
            self.register_buffer("scale", torch.as_tensor(scale))
            self.clip = float(clip)

        def forward(self, x: Tensor) -> Tensor:
            normalised = (x.to(torch.float64) - self.mean) / self.scale
            return torch.clamp(normalised, -self.clip, self.clip).to(torch.float32)

    class _Window(nn.Module):
        """A :class:`~cfc_rl.envs.HistoryWindow` of K frames kept in the state: the raw frames
        ``(K, *frame)``, their Δt ``(K, 1)`` and valid flags ``(K, 1)``, oldest first. At an
        episode start the window is cleared before the new frame goes in, as the wrapper's reset."""

        def __init__(self, frames: int, frame_shape: tuple[int, ...], constant_dt: float | None):
            super().__init__()
            self.frames = frames
            self.frame_shape = frame_shape
            self.frame_size = math.prod(frame_shape)
            self.constant_dt = constant_dt

        def parts(self) -> list[tuple[str, tuple[int, ...], str]]:
            return [
                ("window_obs", (self.frames, *self.frame_shape), "raw frames, oldest first"),
                ("window_dt", (self.frames, 1), "their elapsed times (s)"),
                ("window_valid", (self.frames, 1), "1 for a real frame, 0 for padding"),
            ]

        def forward(
            self, obs: Tensor, dt: Tensor | None, keep: Tensor, state: list[Tensor]
        ) -> tuple[dict[str, Tensor], list[Tensor]]:
            batch = obs.shape[0]
            window_obs, window_dt, window_valid = state
            if dt is None:
                dt = torch.full((batch, 1), self.constant_dt or 0.0, dtype=window_dt.dtype)
            frames = window_obs.reshape(batch, self.frames, self.frame_size) * keep.unsqueeze(-1)
            frame = obs.reshape(batch, 1, self.frame_size).to(frames.dtype)
            frames = torch.cat([frames[:, 1:], frame], dim=1)
            times = torch.cat([window_dt[:, 1:] * keep, dt.to(window_dt.dtype)], dim=1)
            valid = torch.cat([window_valid[:, 1:] * keep, torch.ones_like(keep)], dim=1)
            observation = {
                OBS_KEY: frames.reshape(batch, self.frames, *self.frame_shape),
                DT_KEY: times.unsqueeze(-1),
                VALID_KEY: valid.unsqueeze(-1),
            }
            return observation, [frames.reshape(batch, -1), times, valid]

    class _FrameStack(nn.Module):
        """SB3's ``VecFrameStack`` on 1-D observations (each piece of a Dict stacked on its own):
        the last ``n_stack`` frames, oldest first, as the policy saw them (normalised); cleared at
        an episode start before the new frame goes in."""

        def __init__(self, n_stack: int, pieces: dict[str, int]) -> None:
            super().__init__()
            self.n_stack = n_stack
            self.pieces = pieces

        def parts(self) -> list[tuple[str, tuple[int, ...], str]]:
            return [
                (f"stack_{key}", (self.n_stack, size), f"the last {self.n_stack} frames of {key!r}")
                for key, size in self.pieces.items()
            ]

        def forward(
            self, observation: dict[str, Tensor], keep: Tensor, state: list[Tensor]
        ) -> tuple[dict[str, Tensor], list[Tensor]]:
            stacked, new_state = {}, []
            for (key, size), old in zip(self.pieces.items(), state, strict=True):
                frame = observation[key].reshape(-1, size).to(old.dtype)
                new = torch.cat([old[:, size:] * keep, frame], dim=1)
                stacked[key] = new
                new_state.append(new)
            return stacked, new_state

    def _features(
        extractor: nn.Module, space: spaces.Space, normalize_images: bool, obs: Any
    ) -> Any:
        """What SB3's ``BaseModel.extract_features`` computes: ``preprocess_obs``, then the
        features extractor."""
        from stable_baselines3.common.preprocessing import preprocess_obs

        return extractor(preprocess_obs(obs, space, normalize_images=normalize_images))

    def _cell_state_part(cell: Any) -> tuple[str, tuple[int, ...], str]:
        """The exported state part of an actor's cell: its flat state, described."""
        layout = "[h | c] (mixed memory)" if getattr(cell, "mixed_memory", False) else "h"
        what = f"the actor's {type(cell).__name__} state, {layout}"
        if type(cell).__name__ == "LSTM":
            what = "the actor's LSTM state, [h | c]"
        return ("cell", (cell.state_size,), what)

    class _Actor(nn.Module):
        """The policy's deterministic output before the action mapping, and its own state."""

        state_parts: list[tuple[str, tuple[int, ...], str]]

        def __init__(self, policy: Any) -> None:
            super().__init__()
            self.space = policy.observation_space
            self.normalize_images = policy.normalize_images

        def forward(
            self, observation: Any, start: Tensor, state: list[Tensor]
        ) -> tuple[Tensor, list[Tensor]]:
            raise NotImplementedError

    class _MlpActor(_Actor):
        """``ActorCriticPolicy`` (PPO's MlpPolicy / MultiInputPolicy): features, the actor MLP,
        the action head."""

        def __init__(self, policy: Any) -> None:
            super().__init__(policy)
            self.extractor = policy.pi_features_extractor
            self.policy_net = policy.mlp_extractor.policy_net
            self.action_net = policy.action_net
            self.state_parts = []

        def forward(
            self, observation: Any, start: Tensor, state: list[Tensor]
        ) -> tuple[Tensor, list[Tensor]]:
            features = _features(self.extractor, self.space, self.normalize_images, observation)
            return self.action_net(self.policy_net(features)), []

    class _CellActor(_Actor):
        """RecurrentPPO with :class:`~cfc_rl.sb3.RecurrentCellPolicy`: the actor cell's flat state,
        reset where an episode starts (the cell's ``resets``)."""

        def __init__(self, policy: Any) -> None:
            super().__init__(policy)
            self.extractor = policy.pi_features_extractor
            self.cell = policy.lstm_actor
            self.policy_net = policy.mlp_extractor.policy_net
            self.action_net = policy.action_net
            self.state_parts = [_cell_state_part(self.cell.cell)]

        def forward(
            self, observation: Any, start: Tensor, state: list[Tensor]
        ) -> tuple[Tensor, list[Tensor]]:
            features = _features(self.extractor, self.space, self.normalize_images, observation)
            hidden = state[0].unsqueeze(0)
            latent, (new_hidden, _) = self.cell(features, (hidden, hidden), start)
            return self.action_net(self.policy_net(latent)), [new_hidden[0]]

    class _LstmActor(_Actor):
        """RecurrentPPO with sb3-contrib's ``MlpLstmPolicy``: ``h`` and ``c`` of the actor's
        ``nn.LSTM`` (layers × units each), multiplied by ``1 - episode_start`` before the step, as
        sb3-contrib's ``_process_sequence`` does."""

        def __init__(self, policy: Any) -> None:
            super().__init__(policy)
            self.extractor = policy.pi_features_extractor
            self.lstm = policy.lstm_actor
            self.policy_net = policy.mlp_extractor.policy_net
            self.action_net = policy.action_net
            layers, units = self.lstm.num_layers, self.lstm.hidden_size
            self.state_parts = [
                ("lstm_h", (layers, units), "h of the actor LSTM, per layer"),
                ("lstm_c", (layers, units), "c of the actor LSTM, per layer"),
            ]

        def forward(
            self, observation: Any, start: Tensor, state: list[Tensor]
        ) -> tuple[Tensor, list[Tensor]]:
            features = _features(self.extractor, self.space, self.normalize_images, observation)
            batch = features.shape[0]
            layers, units = self.lstm.num_layers, self.lstm.hidden_size
            keep = (1.0 - start).view(1, batch, 1)
            h, c = (part.reshape(batch, layers, units).transpose(0, 1) * keep for part in state)
            latent, (h, c) = self.lstm(features.unsqueeze(0), (h.contiguous(), c.contiguous()))
            action = self.action_net(self.policy_net(latent[0]))
            return action, [
                h.transpose(0, 1).reshape(batch, -1),
                c.transpose(0, 1).reshape(batch, -1),
            ]

    class _SacActor(_Actor):
        """SAC's actor: features, ``latent_pi``, ``mu``; the deterministic action is ``tanh(mu)``
        (squashed Gaussian, and squashed gSDE)."""

        def __init__(self, policy: Any) -> None:
            actor = policy.actor
            super().__init__(actor)
            self.extractor = actor.features_extractor
            self.latent_pi = actor.latent_pi
            self.mu = actor.mu
            self.state_parts = []

        def forward(
            self, observation: Any, start: Tensor, state: list[Tensor]
        ) -> tuple[Tensor, list[Tensor]]:
            features = _features(self.extractor, self.space, self.normalize_images, observation)
            return torch.tanh(self.mu(self.latent_pi(features))), []

    class _RecurrentSacActor(_Actor):
        """:class:`~cfc_rl.sb3.RecurrentSAC`'s actor: features (Δt split off), the actor cell
        (its state reset where an episode starts), ``latent_pi``, ``mu``; the deterministic
        action is ``tanh(mu)``, as SAC's."""

        def __init__(self, policy: Any) -> None:
            actor = policy.actor
            super().__init__(actor)
            self.actor = actor
            self.state_parts = [_cell_state_part(actor.cell)]

        def forward(
            self, observation: Any, start: Tensor, state: list[Tensor]
        ) -> tuple[Tensor, list[Tensor]]:
            actor = self.actor
            features = _features(
                actor.features_extractor, self.space, self.normalize_images, observation
            )
            x, dt = actor.split_time(features)
            dt = None if dt is None else dt[:, None]
            x, timespans = time_input(actor.cell, x.unsqueeze(1), dt)
            resets = start[:, None] > 0.5
            y, new_state = actor.cell(x, state[0], timespans=timespans, resets=resets)
            mean, _ = actor.distribution_params(y[:, 0])
            return torch.tanh(mean), [new_state]

    class _ActionMap(nn.Module):
        """The deterministic output to an action, as ``BasePolicy.predict`` maps it: ``argmax``
        (Discrete); for a Box, ``tanh`` first where the distribution squashes its mode but the
        actor does not (gSDE with ``squash_output``), then a rescale to the bounds where the policy
        squashes, else a clip to them."""

        def __init__(self, kind: str, space: spaces.Space, squash: bool, tanh: bool) -> None:
            super().__init__()
            self.kind = kind
            self.squash = squash
            self.tanh = tanh
            if isinstance(space, spaces.Box):
                self.shape = tuple(space.shape)
                self.register_buffer("low", torch.as_tensor(space.low, dtype=torch.float32))
                self.register_buffer("high", torch.as_tensor(space.high, dtype=torch.float32))

        def forward(self, output: Tensor) -> Tensor:
            if self.kind == "argmax":
                return torch.argmax(output, dim=1)
            action = output.reshape(-1, *self.shape)
            if self.tanh:
                action = torch.tanh(action)
            if self.squash:  # BasePolicy.unscale_action, in its order of operations
                return self.low + 0.5 * (action + 1.0) * (self.high - self.low)
            return torch.minimum(torch.maximum(action, self.low), self.high)  # np.clip

    class ExportedPolicy(nn.Module):
        """One control step of a trained policy, from raw sensor values to the action (see the
        module docstring). Build it with :func:`build_exported_policy`; ``forward`` takes the
        inputs named by :attr:`input_names`, in that order.

        :param actor: the policy's actor part
        :param action_map: its output to an action
        :param normalizers: VecNormalize's statistics per observation key (``"obs"`` for a Box)
        :param window: a history window kept in the state, or None
        :param stack: frame stacking kept in the state, or None
        :param box_policy: the policy reads a Box (else a Dict)
        :param obs_shape: the shape of one observation (the ``obs`` input), batch excluded
        :param obs_dtype: its dtype
        :param reads_dt: whether Δt is an input
        :param state_dtype: dtype of the flat state (float64 only where float64 frames are kept)
        """

        def __init__(
            self,
            actor: _Actor,
            action_map: _ActionMap,
            normalizers: dict[str, _Normalizer],
            window: _Window | None,
            stack: _FrameStack | None,
            *,
            box_policy: bool,
            obs_shape: tuple[int, ...],
            obs_dtype: torch.dtype,
            reads_dt: bool,
            state_dtype: torch.dtype,
        ) -> None:
            super().__init__()
            self.actor = actor
            self.action_map = action_map
            self.normalizers = nn.ModuleDict(normalizers)
            self.window = window
            self.stack = stack
            self.box_policy = box_policy
            self.obs_shape = obs_shape
            self.obs_dtype = obs_dtype
            self.reads_dt = reads_dt
            self.state_dtype = state_dtype
            parts: list[_Part] = []
            offset = 0
            stages = [*(window.parts() if window else []), *(stack.parts() if stack else [])]
            for name, shape, holds in [*stages, *actor.state_parts]:
                parts.append(_Part(name, offset, shape, holds))
                offset += parts[-1].size
            self.parts = parts
            self.window_parts = len(window.parts()) if window else 0
            self.stage_parts = len(stages)
            self.state_size = offset
            self.input_names = ["obs", "state", *(["dt"] if reads_dt else []), "episode_start"]
            self.output_names = ["action", "new_state"]

        def step(
            self, obs: Tensor, state: Tensor, dt: Tensor | None, episode_start: Tensor
        ) -> tuple[Tensor, Tensor]:
            """One control step (the inputs of the module docstring; ``dt`` None where the policy
            does not read it)."""
            batch = obs.shape[0]
            start = episode_start.reshape(batch).to(torch.float32)
            keep = (1.0 - start).unsqueeze(-1).to(self.state_dtype)
            blocks = [state[:, p.offset : p.offset + p.size] for p in self.parts]
            window_state = blocks[: self.window_parts]
            stack_state = blocks[self.window_parts : self.stage_parts]
            actor_state = [block.to(torch.float32) for block in blocks[self.stage_parts :]]
            new_blocks: list[Tensor] = []
            observation: dict[str, Tensor]
            if self.window is not None:
                observation, window_new = self.window(obs, dt, keep, window_state)
                new_blocks += window_new
            else:
                observation = {OBS_KEY: obs} if dt is None else {OBS_KEY: obs, DT_KEY: dt}
            for key, normalizer in self.normalizers.items():
                observation[key] = normalizer(observation[key])
            if self.stack is not None:
                observation, stack_new = self.stack(observation, keep, stack_state)
                new_blocks += stack_new
            policy_input: Any = observation[OBS_KEY] if self.box_policy else observation
            output, actor_new = self.actor(policy_input, start, actor_state)
            new_blocks += [block.to(self.state_dtype) for block in actor_new]
            if new_blocks:
                new_state = torch.cat([block.reshape(batch, -1) for block in new_blocks], dim=1)
            else:
                new_state = state * 1.0  # (B, 0), a tensor of its own
            return self.action_map(output), new_state

    class _WithDt(ExportedPolicy):
        def forward(
            self, obs: Tensor, state: Tensor, dt: Tensor, episode_start: Tensor
        ) -> tuple[Tensor, Tensor]:
            return self.step(obs, state, dt, episode_start)

    class _WithoutDt(ExportedPolicy):
        def forward(
            self, obs: Tensor, state: Tensor, episode_start: Tensor
        ) -> tuple[Tensor, Tensor]:
            return self.step(obs, state, None, episode_start)

    return SimpleNamespace(
        _Normalizer=_Normalizer,
        _Window=_Window,
        _FrameStack=_FrameStack,
        _Actor=_Actor,
        _MlpActor=_MlpActor,
        _CellActor=_CellActor,
        _LstmActor=_LstmActor,
        _SacActor=_SacActor,
        _RecurrentSacActor=_RecurrentSacActor,
        _ActionMap=_ActionMap,
        ExportedPolicy=ExportedPolicy,
        _WithDt=_WithDt,
        _WithoutDt=_WithoutDt,
        _features=_features,
    )


# What a run holds -> the module ------------------------------------------------------------


@dataclass
class RunParts:
    """What :func:`build_exported_policy` reads from a run (:func:`load_run_parts`).

    :param model: the loaded SB3 model, on the CPU
    :param task: the run's task, the agent's wrappers merged in
    :param frame_stack: the agent's ``VecFrameStack`` size, or None
    :param statistics: the VecNormalize of the run (unpickled, without its VecEnv), or None
    :param frame_space: one observation as the robot reads it (without a history window)
    :param base_dt: seconds per base step of the task
    """

    model: Any
    task: Task
    frame_stack: int | None
    statistics: Any
    frame_space: spaces.Space
    base_dt: float


def _actor_of(model: Any) -> tuple[Any, str]:
    """The actor part of a loaded model's policy and its kind (``"gaussian"``, ``"sac"``,
    ``"argmax"``); an ExportError naming what is not supported."""
    import torch
    from sb3_contrib.common.recurrent.policies import RecurrentActorCriticPolicy
    from stable_baselines3.common.distributions import (
        CategoricalDistribution,
        DiagGaussianDistribution,
        StateDependentNoiseDistribution,
    )
    from stable_baselines3.common.policies import ActorCriticPolicy
    from stable_baselines3.sac.policies import SACPolicy

    from cfc_rl.sb3 import RecurrentSACPolicy
    from cfc_rl.sb3.recurrent import PolicyCell

    parts = _torch_parts()
    policy = model.policy
    name = type(policy).__name__
    if isinstance(policy, RecurrentSACPolicy):  # a SACPolicy too: checked first
        return parts._RecurrentSacActor(policy), "sac"
    if isinstance(policy, SACPolicy):
        return parts._SacActor(policy), "sac"
    if not isinstance(policy, ActorCriticPolicy):
        raise ExportError(
            f"cannot export a {type(model).__name__} policy {name}: the exporter knows "
            "RecurrentPPO (RecurrentCellPolicy, MlpLstmPolicy), PPO (MlpPolicy), SAC "
            "(MlpPolicy) and RecurrentSAC"
        )
    distribution = policy.action_dist
    if isinstance(distribution, CategoricalDistribution):
        kind = "argmax"
    elif isinstance(distribution, (DiagGaussianDistribution, StateDependentNoiseDistribution)):
        kind = "gaussian"
    else:
        raise ExportError(
            f"cannot export {name}: its action distribution {type(distribution).__name__} has "
            "no deterministic mapping here (supported: Box with a Gaussian or gSDE, Discrete)"
        )
    if isinstance(policy, RecurrentActorCriticPolicy):
        if isinstance(policy.lstm_actor, PolicyCell):
            return parts._CellActor(policy), kind
        if isinstance(policy.lstm_actor, torch.nn.LSTM):
            return parts._LstmActor(policy), kind
        raise ExportError(
            f"cannot export {name}: its recurrent actor is a {type(policy.lstm_actor).__name__}, "
            "not a cfc_rl PolicyCell or an nn.LSTM"
        )
    if type(policy).__name__ not in ("ActorCriticPolicy", "MultiInputActorCriticPolicy"):
        raise ExportError(
            f"cannot export {name}: an ActorCriticPolicy subclass the exporter does not know "
            "(it may compute its actions differently); supported: MlpPolicy, MultiInputPolicy"
        )
    return parts._MlpActor(policy), kind


def _frame_pieces(space: spaces.Space) -> tuple[tuple[int, ...], bool]:
    """The shape of the ``obs`` input and whether ``dt`` is an input, for one observation as
    the robot reads it: a Box, or a Dict of a Box ``"obs"`` and ``"dt"``."""
    from gymnasium import spaces

    if isinstance(space, spaces.Box):
        return tuple(space.shape), False
    if (
        isinstance(space, spaces.Dict)
        and set(space.spaces) <= {OBS_KEY, DT_KEY}
        and isinstance(space.spaces.get(OBS_KEY), spaces.Box)
    ):
        return tuple(space[OBS_KEY].shape), DT_KEY in space.spaces
    raise ExportError(
        f"cannot export a policy for observations {space}: the exporter takes a Box or a Dict "
        f"of {OBS_KEY!r} (a Box) and {DT_KEY!r}"
    )


def _normalizers(statistics: Any, box: bool) -> dict[str, Any]:
    """One :class:`_Normalizer` per normalised observation key (a Box observation is the
    ``"obs"`` piece)."""
    if statistics is None or not statistics.norm_obs:
        return {}

    def make(rms: Any) -> Any:
        return _torch_parts()._Normalizer(
            rms.mean, rms.var, statistics.epsilon, statistics.clip_obs
        )

    if box:
        return {OBS_KEY: make(statistics.obs_rms)}
    return {key: make(statistics.obs_rms[key]) for key in statistics.norm_obs_keys}


def build_exported_policy(parts: RunParts) -> Any:
    """The :class:`ExportedPolicy` (an ``nn.Module``) of a loaded run, in eval mode, on the CPU.

    :param parts: the model, task, frame stacking, statistics and observation layout
    :raises ExportError: for a policy, space or layout the exporter does not know
    """
    import numpy as np
    import torch
    from gymnasium import spaces

    pieces = _torch_parts()
    model, task = parts.model, parts.task
    policy = model.policy
    policy.set_training_mode(False)
    actor, kind = _actor_of(model)
    obs_shape, reads_dt = _frame_pieces(parts.frame_space)
    box = isinstance(policy.observation_space, spaces.Box)
    history, irregular = task.env.wrappers.history, task.env.wrappers.irregular
    if box and (reads_dt or history is not None):
        raise ExportError(
            f"cannot export: the policy reads a Box {policy.observation_space} but the task "
            f"gives {parts.frame_space}{' in a history window' if history else ''}"
        )
    window = None
    if history is not None:
        # Without irregular time every frame's Δt is the fixed period (HistoryWindow reads
        # info["dt"]): a constant of the module.
        period = (irregular[0] if irregular is not None else 1) * parts.base_dt
        window = pieces._Window(history, obs_shape, None if reads_dt else period)
    stack = None
    if parts.frame_stack:
        if window is not None or len(obs_shape) != 1:
            raise ExportError(
                "cannot export frame stacking of a history window or of observations that are "
                f"not 1-D (shape {obs_shape}); the exporter stacks 1-D observations"
            )
        stack = pieces._FrameStack(
            parts.frame_stack, {OBS_KEY: obs_shape[0], **({DT_KEY: 1} if reads_dt else {})}
        )
    action_space = policy.action_space
    if kind == "argmax" and isinstance(action_space, spaces.Discrete):
        action_map = pieces._ActionMap("argmax", action_space, squash=False, tanh=False)
    elif kind != "argmax" and isinstance(action_space, spaces.Box):
        squash = bool(policy.squash_output)
        # gSDE with squash_output squashes its mode in the distribution (PPO); SAC's actor
        # has applied tanh already.
        action_map = pieces._ActionMap(
            "box", action_space, squash, tanh=kind == "gaussian" and squash
        )
    else:
        raise ExportError(
            f"cannot export actions in {action_space}: the exporter maps Discrete and Box actions"
        )
    frame = parts.frame_space
    frame_box = frame if isinstance(frame, spaces.Box) else frame[OBS_KEY]
    obs_dtype = torch.float64 if frame_box.dtype == np.float64 else torch.float32
    normalizers = _normalizers(parts.statistics, box)
    # Raw float64 frames kept in a window, or stacked unnormalised, keep their precision.
    keeps_float64 = obs_dtype == torch.float64 and (
        window is not None or (stack is not None and OBS_KEY not in normalizers)
    )
    cls = pieces._WithDt if reads_dt else pieces._WithoutDt
    module = cls(
        actor,
        action_map,
        normalizers,
        window,
        stack,
        box_policy=box,
        obs_shape=obs_shape,
        obs_dtype=obs_dtype,
        reads_dt=reads_dt,
        state_dtype=torch.float64 if keeps_float64 else torch.float32,
    )
    return module.eval()


def __getattr__(name: str) -> Any:
    # ExportedPolicy is defined with torch, on first use (see _torch_parts).
    if name == "ExportedPolicy":
        return _torch_parts().ExportedPolicy
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# The run -> the file -------------------------------------------------------------------------


def _check_packages(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}; choose {' or '.join(FORMATS)}")
    if fmt == "onnx":
        missing = [m for m in ("onnx", "onnxscript", "onnxruntime") if not _installed(m)]
        if missing:
            raise ExportError(
                f"ONNX export needs {', '.join(missing)}: install them with {INSTALL_ONNX}"
            )


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _read_statistics(path: Path | None) -> Any:
    if path is None:
        return None
    try:
        with path.open("rb") as f:
            return pickle.load(f)  # a VecNormalize, without its VecEnv (as VecNormalize.load)
    except (pickle.UnpicklingError, EOFError, AttributeError, ValueError) as e:
        raise RunError(f"{path} is damaged and cannot be read ({type(e).__name__}: {e})") from e


def load_run_parts(run_dir: str | os.PathLike[str], model: str = "final") -> RunParts:
    """Load what :func:`build_exported_policy` needs from a run folder, on the CPU.

    :param run_dir: a run folder written by :func:`~cfc_rl.experiment.train.train`
    :param model: ``"final"``, ``"best"`` or the path of a checkpoint
    :raises FileNotFoundError: if the run has no such model (yet)
    """
    from cfc_rl.envs import base_dt, make_task
    from cfc_rl.experiment.algorithms import algorithm
    from cfc_rl.experiment.evaluate import model_files
    from cfc_rl.experiment.train import configs_from_record

    run = RunFolder(Path(run_dir))
    agent, task = configs_from_record(run.read_config())
    model_path, statistics = model_files(run, model, task.train.normalize)
    loaded = load_model(algorithm(agent.algo).cls, model_path, device="cpu")
    with make_task(task.env, history=None) as env:
        frame_space, dt = env.observation_space, base_dt(env)
    return RunParts(loaded, task, agent.frame_stack, _read_statistics(statistics), frame_space, dt)


def _example_inputs(module: Any, batch: int, steps: int, seed: int) -> list[tuple]:
    """Inputs of ``steps`` consecutive steps (the state is filled in as they run): normal
    observations, Δt of 1 to 4 base periods, an episode start at the first and a middle step
    for some samples."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    rows = []
    for t in range(steps):
        obs = torch.randn(batch, *module.obs_shape, generator=generator).to(module.obs_dtype)
        start = torch.zeros(batch)
        if t == 0 or t == steps // 2:
            start[:: 2 if t else 1] = 1.0
        dt = torch.randint(1, 5, (batch, 1), generator=generator).float() * 0.05
        rows.append((obs, dt, start))
    return rows


def _inputs(module: Any, obs: Tensor, state: Tensor, dt: Tensor, start: Tensor) -> tuple:
    return (obs, state, dt, start) if module.reads_dt else (obs, state, start)


def _run_steps(module: Any, call: Any, rows: list[tuple]) -> list[tuple]:
    """Actions and states of consecutive steps, the state carried, through ``call``."""
    import torch

    state = torch.zeros(rows[0][0].shape[0], module.state_size, dtype=module.state_dtype)
    outputs = []
    for obs, dt, start in rows:
        action, state = call(*_inputs(module, obs, state, dt, start))
        action, state = torch.as_tensor(action), torch.as_tensor(state)
        outputs.append((action, state))
    return outputs


def _difference(expected: list[tuple], got: list[tuple]) -> float:
    worst = 0.0
    for pair_expected, pair_got in zip(expected, got, strict=True):
        for a, b in zip(pair_expected, pair_got, strict=True):
            if a.shape != b.shape or a.dtype != b.dtype:
                return math.inf
            if a.numel():
                worst = max(worst, float((a.double() - b.double()).abs().max()))
    return worst


@contextlib.contextmanager
def _quiet(name: str) -> Iterator[None]:
    """Only errors from the logger ``name`` (torch's ONNX exporter logs a warning for every
    torchvision operator it cannot register when torchvision is not installed)."""
    log = logging.getLogger(name)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _write(module: Any, fmt: str, path: Path, example: tuple) -> Any:
    """Write ``module`` to ``path``; return a callable running the written file."""
    import torch

    if fmt == "torchscript":
        with warnings.catch_warnings():
            # TorchScript is deprecated in favour of torch.export, and torch.nn.LSTM's own
            # shape checks warn under a tracer (they are constant for the traced shapes).
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.filterwarnings(
                "ignore", category=torch.jit.TracerWarning, module=r"torch\.nn\.modules\.rnn"
            )
            traced = torch.jit.trace(module, example, check_trace=False)
            atomic_write(path, lambda f: torch.jit.save(traced, f))
            loaded = torch.jit.load(str(path))
        return lambda *args: loaded(*args)
    import onnxruntime

    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    shapes = {name: {0: batch} for name in module.input_names}
    with warnings.catch_warnings(), _quiet("torch.onnx"):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module,
            example,
            input_names=module.input_names,
            output_names=module.output_names,
            dynamic_shapes=shapes,
            dynamo=True,
            verbose=False,
        )
    atomic_write(path, lambda f: f.write(program.model_proto.SerializeToString()))
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]

    def run(*args: Tensor) -> tuple[np.ndarray, np.ndarray]:
        feeds = {n: a.numpy() for n, a in zip(module.input_names, args, strict=True)}
        return tuple(session.run(None, {n: feeds[n] for n in names}))

    return run


def _cell_name(policy: Any) -> str | None:
    """The name (of :data:`cfc_rl.nn.CELLS`) of a RecurrentCellPolicy's cell or of a
    SequenceExtractor's, else None."""
    from cfc_rl.sb3 import SequenceExtractor

    if isinstance(getattr(policy, "cell_name", None), str):
        return policy.cell_name
    if getattr(policy, "features_extractor_class", None) is SequenceExtractor:
        return policy.features_extractor_kwargs.get("cell", "cfc")
    return None


def json_text(data: Any) -> str:
    """``data`` as indented JSON with lists of numbers and names on one line.

    :param data: what ``json.dumps`` takes
    """
    text = json.dumps(data, indent=2)
    return re.sub(
        r"\[\n\s*([^\[\]{}]*?)\n\s*\]",
        lambda m: "[" + re.sub(r",\n\s*", ", ", m.group(1)) + "]",
        text,
    )


def _space_description(space: spaces.Space) -> str:
    return str(space).replace("\n", " ")


def _metadata(
    module: Any, parts: RunParts, run: RunFolder, model: str, fmt: str, path: Path
) -> dict[str, Any]:
    import numpy as np
    import torch
    from gymnasium import spaces

    from cfc_rl.experiment.evaluate import default_seed

    task = parts.task
    wrappers = task.env.wrappers.as_kwargs()
    irregular = wrappers.get("irregular")
    obs_dtype = "float64" if module.obs_dtype == torch.float64 else "float32"
    state_dtype = "float64" if module.state_dtype == torch.float64 else "float32"
    inputs = [
        {
            "name": "obs",
            "shape": ["B", *module.obs_shape],
            "dtype": obs_dtype,
            "holds": "raw sensor values as the task returns them (normalised inside)",
        },
        {
            "name": "state",
            "shape": ["B", module.state_size],
            "dtype": state_dtype,
            "holds": "zeros at the start; new_state of the previous step after",
        },
    ]
    if module.reads_dt:
        inputs.append(
            {
                "name": "dt",
                "shape": ["B", 1],
                "dtype": "float32",
                "holds": "elapsed time of this step in seconds (the observation's dt)",
            }
        )
    inputs.append(
        {
            "name": "episode_start",
            "shape": ["B"],
            "dtype": "float32",
            "holds": "1.0 where obs is the first observation of an episode, else 0.0",
        }
    )
    action_space = parts.model.policy.action_space
    if isinstance(action_space, spaces.Discrete):
        action = {"space": "Discrete", "n": int(action_space.n), "dtype": "int64"}
        action["mapping"] = "argmax of the logits"
        action_shape: list[Any] = ["B"]
    else:
        action = {
            "space": "Box",
            "shape": list(action_space.shape),
            "dtype": "float32",
            "low": np.asarray(action_space.low, dtype=float).tolist(),
            "high": np.asarray(action_space.high, dtype=float).tolist(),
            "mapping": (
                "tanh, then rescaled from [-1, 1] to [low, high]"
                if module.action_map.squash
                else "Gaussian mean clipped to [low, high]"
            ),
        }
        action_shape = ["B", *action_space.shape]
    outputs = [
        {"name": "action", "shape": action_shape, "dtype": action["dtype"]},
        {"name": "new_state", "shape": ["B", module.state_size], "dtype": state_dtype},
    ]
    if irregular is None or irregular[0] == irregular[1]:
        repeats = 1 if irregular is None else irregular[0]
        period: dict[str, Any] = {
            "fixed": True,
            "seconds": repeats * parts.base_dt,
            "base_dt": parts.base_dt,
            "repeats": repeats,
        }
    else:
        period = {
            "fixed": False,
            "seconds": "read dt",
            "base_dt": parts.base_dt,
            "repeats": list(irregular),
        }
    statistics = parts.statistics
    normalization = None
    if module.normalizers:
        normalization = {
            "keys": list(module.normalizers),
            "clip": float(statistics.clip_obs),
            "epsilon": float(statistics.epsilon),
            "folded_in": True,
        }
    observation = {
        "space": _space_description(parts.frame_space),
        "inputs": ["obs", *(["dt"] if module.reads_dt else [])],
        "normalization": normalization,
    }
    if module.window is not None:
        observation["history_window"] = module.window.frames
    if module.stack is not None:
        observation["frame_stack"] = module.stack.n_stack
    policy = parts.model.policy
    runtime_wrappers = {k: v for k, v in wrappers.items() if k != "history"}
    return {
        "file": path.name,
        "format": fmt,
        "run": str(run.root),
        "model": model,
        "algorithm": type(parts.model).__name__,
        "policy": type(policy).__name__,
        "cell": _cell_name(policy),
        "inputs": inputs,
        "outputs": outputs,
        "state": {
            "size": module.state_size,
            "dtype": state_dtype,
            "parts": [
                {"name": p.name, "offset": p.offset, "shape": list(p.shape), "holds": p.holds}
                for p in module.parts
            ],
        },
        "observation": observation,
        "action": action,
        "control_period": period,
        "env": {
            "id": task.id,
            "wrappers": {
                k: list(v) if isinstance(v, tuple) else v for k, v in runtime_wrappers.items()
            },
            "env_kwargs": dict(task.env.env_kwargs),
        },
        "evaluation": {
            "seed": default_seed(run),
            "episodes": task.eval.episodes,
            "deterministic": task.eval.deterministic,
        },
        "versions": {
            "torch": torch.__version__,
            "python": sys.version.split()[0],
        },
    }


def metadata_file(path: str | os.PathLike[str]) -> Path:
    """The JSON that describes an exported file: its name + ``.json`` (``policy.onnx.json``).

    :param path: the exported file
    """
    path = Path(path)
    return path.with_name(path.name + ".json")


def default_output(run: RunFolder, model: str, fmt: str) -> Path:
    """``RUN/policy.<suffix>`` for the final model, ``RUN/policy_best.<suffix>`` for the best
    one, ``RUN/policy_<checkpoint>.<suffix>`` for a checkpoint.

    :param run: the run folder
    :param model: ``"final"``, ``"best"`` or the path of a checkpoint
    :param fmt: a key of :data:`FORMATS`
    """
    name = {"final": "policy", "best": "policy_best"}.get(model, f"policy_{Path(model).stem}")
    return run.root / f"{name}{FORMATS[fmt]}"


def export_run(
    run_dir: str | os.PathLike[str],
    *,
    format: str = "onnx",
    out: str | os.PathLike[str] | None = None,
    model: str = "final",
) -> dict[str, Any]:
    """Export a run's policy to one file and describe it in a JSON file beside it (the file's
    name + ``.json``); check that the written file computes what the policy computes.

    :param run_dir: a run folder written by :func:`~cfc_rl.experiment.train.train`
    :param format: ``"onnx"`` or ``"torchscript"``
    :param out: the file to write; defaults to :func:`default_output`
    :param model: ``"final"``, ``"best"`` or the path of a checkpoint
    :return: the JSON's content, with ``"path"`` and ``"metadata_path"`` added
    :raises ExportError: for an unsupported policy or layout, a missing package, an ``out``
        that is a folder, or a file that does not compute the policy's actions (an earlier
        export at ``out`` is then left as it was)
    :raises FileNotFoundError: if the run has no such model (yet)
    """
    import torch

    _check_packages(format)
    run = RunFolder(Path(run_dir))
    path = Path(out) if out is not None else default_output(run, model, format)
    if path.is_dir():
        raise ExportError(
            f"{path} is a folder: give the file to write, e.g. {path / f'policy{FORMATS[format]}'}"
        )
    parts = load_run_parts(run_dir, model)
    module = build_exported_policy(parts)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = _example_inputs(module, batch=3, steps=6, seed=0)
    state = torch.zeros(3, module.state_size, dtype=module.state_dtype)
    example = _inputs(module, rows[0][0], state, rows[0][1], rows[0][2])
    # Written and checked beside the destination, which it replaces only once it passes: a
    # file that fails the check leaves an earlier export (and its JSON) as they were.
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix)
    os.close(fd)
    staged = Path(name)
    try:
        with torch.no_grad():
            expected = _run_steps(module, module, rows)
            call = _write(module, format, staged, example)
            got = _run_steps(module, call, rows)
        difference = _difference(expected, got)
        if not difference <= CHECK_ATOL:
            raise ExportError(
                f"the written {format} file gives actions or states up to {difference:.3g} away "
                f"from the policy's (more than {CHECK_ATOL:g}); it was not kept. Please report "
                "this with the run's config.yaml"
            )
        os.replace(staged, path)
    finally:
        staged.unlink(missing_ok=True)
    metadata = _metadata(module, parts, run, model, format, path)
    metadata["check"] = {"steps": len(rows), "batch": 3, "max_abs_diff": difference}
    metadata_path = metadata_file(path)
    atomic_write_text(metadata_path, json_text(metadata) + "\n")
    logger.info("wrote %s and %s (checked: max |diff| %.2g)", path, metadata_path, difference)
    return {**metadata, "path": str(path), "metadata_path": str(metadata_path)}


# The command ---------------------------------------------------------------------------------


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``cfc-rl export``.

    :param parser: the command's parser
    """
    parser.add_argument("run_dir", metavar="RUN", help="a run folder written by cfc-rl train")
    parser.add_argument("--format", choices=tuple(FORMATS), default="onnx", help="default: onnx")
    parser.add_argument(
        "--out",
        metavar="FILE",
        default=None,
        help="the file to write (default: RUN/policy.onnx or RUN/policy.pt); its description "
        "goes beside it, FILE.json",
    )
    parser.add_argument(
        "--model",
        metavar="final|best|PATH",
        default="final",
        help="final (default), best (the best periodic evaluation's) or a checkpoint's path",
    )


def export_command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Run ``cfc-rl export``: write the file and its JSON, print the JSON.

    :param args: the parsed arguments (see :func:`add_export_arguments`)
    :param parser: the command's parser
    :return: the exit code: 0, or 2 for a run that cannot be exported (one line on stderr)
    """
    try:
        result = export_run(args.run_dir, format=args.format, out=args.out, model=args.model)
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json_text({k: v for k, v in result.items() if k not in ("path", "metadata_path")}))
    print(f"written: {result['path']}, {result['metadata_path']}")
    return 0
