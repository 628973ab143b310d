"""The policy of :class:`~cfc_rl.sb3.RecurrentSAC`: a recurrent actor and recurrent twin critics.

Actor: features extractor → cell → MLP (``net_arch``) → SB3's squashed Gaussian heads (``mu``,
``log_std``). Critics: one features extractor, then per critic its own cell over the
observation history and ``Q = MLP([cell output, action])``. Target critics as in SAC. Cells
are any of :data:`cfc_rl.nn.CELLS`; Dict observations with ``"dt"`` give Δt to the cells as in
:class:`~cfc_rl.sb3.RecurrentCellPolicy` (``timespans``; LSTM/GRU as an input feature).

Training runs the cells over padded sequences in one call each (see
:class:`~cfc_rl.sb3.recurrent_sac.buffers.SequenceReplayBufferSamples`): padded positions are
replaced by zeros (``torch.where``) before the features extractor and before the cell, the
state is zeroed at each sequence's first valid position, and the burn-in steps run without
gradient.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
from gymnasium import spaces
from stable_baselines3.common.policies import ContinuousCritic
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from stable_baselines3.common.type_aliases import PyTorchObs, Schedule
from stable_baselines3.sac.policies import LOG_STD_MAX, LOG_STD_MIN, Actor, SACPolicy
from torch import Tensor, nn

from cfc_rl.nn import RecurrentModule, cell_input_size, make_cell, time_input
from cfc_rl.sb3.extractors import ElapsedTimeExtractor, default_extractor_class

__all__ = ["RecurrentActor", "RecurrentCritic", "RecurrentSACPolicy"]

DEFAULT_NET_ARCH = [64, 64]
"""The MLP after the cell of the actor and of each critic when ``net_arch`` is None."""


def _where_valid(observations: PyTorchObs, valid: Tensor) -> PyTorchObs:
    """Zeros where ``valid (B, T)`` is False, for tensors (or dicts of them) ``(B, T, ...)``:
    ``torch.where``, so that NaN or inf in padding neither reaches a module nor its gradient."""
    if isinstance(observations, dict):
        return {key: _where_valid(value, valid) for key, value in observations.items()}  # type: ignore[misc]
    keep = valid.reshape(valid.shape + (1,) * (observations.dim() - valid.dim()))
    return torch.where(keep, observations, observations.new_zeros(()))


def _flatten_time(observations: PyTorchObs) -> PyTorchObs:
    if isinstance(observations, dict):
        return {key: _flatten_time(value) for key, value in observations.items()}  # type: ignore[misc]
    return observations.flatten(0, 1)


def first_valid(valid: Tensor) -> Tensor:
    """The resets of padded sequences: True at the first valid position of each run of valid
    positions (the state starts from zeros there, whatever the padding before it did)."""
    previous = torch.cat([torch.zeros_like(valid[:, :1]), valid[:, :-1]], dim=1)
    return valid & ~previous


class _CellMixin:
    """What the recurrent actor and critic share: features of whole sequences, Δt, the cells."""

    features_extractor: BaseFeaturesExtractor
    time_in_features: bool

    def sequence_features(self, observations: PyTorchObs, valid: Tensor) -> Tensor:
        """The features extractor's output ``(B, T, features_dim)`` for observations
        ``(B, T, ...)``, with padded positions zeroed before the extractor sees them."""
        batch, steps = valid.shape
        flat = _flatten_time(_where_valid(observations, valid))
        features = self.extract_features(flat, self.features_extractor)  # type: ignore[attr-defined]
        return features.reshape(batch, steps, -1)

    def split_time(self, features: Tensor) -> tuple[Tensor, Tensor | None]:
        """``(features without Δt, Δt)``: Δt is the extractor's last feature when it is an
        :class:`ElapsedTimeExtractor`, else None. Works on ``(..., features_dim)``."""
        if self.time_in_features:
            return features[..., :-1], features[..., -1]
        return features, None

    def run_cell(
        self,
        cell: RecurrentModule,
        features: Tensor,
        valid: Tensor,
        burn_in: int,
        steps: int | None = None,
    ) -> Tensor:
        """Run ``cell`` over padded sequences of features.

        Padded features and Δt become zeros (``torch.where``) before the cell, the state is
        reset at each sequence's first valid position; the first ``burn_in`` positions run
        under ``torch.no_grad`` and only give the state the rest starts from (R2D2).

        :param cell: the cell
        :param features: ``(B, T, features_dim)`` from :meth:`sequence_features`
        :param valid: ``(B, T)`` bool
        :param burn_in: K, the positions that only warm up the state
        :param steps: how many positions after the burn-in to return (all when None)
        :return: the cell's outputs ``(B, steps, output_size)`` at positions ``K .. K+steps-1``
        """
        end = features.shape[1] if steps is None else burn_in + steps
        x, dt = self.split_time(features[:, :end])
        valid = valid[:, :end]
        dtype = next(cell.parameters()).dtype
        x = torch.where(valid.unsqueeze(-1), x, x.new_zeros(())).to(dtype)
        if dt is not None:
            dt = torch.where(valid, dt, dt.new_zeros(())).to(dtype)
        x, timespans = time_input(cell, x, dt)
        resets = first_valid(valid)
        state = None
        if burn_in > 0:
            with torch.no_grad():
                _, state = cell(
                    x[:, :burn_in],
                    timespans=None if timespans is None else timespans[:, :burn_in],
                    resets=resets[:, :burn_in],
                )
        y, _ = cell(
            x[:, burn_in:],
            state,
            timespans=None if timespans is None else timespans[:, burn_in:],
            resets=resets[:, burn_in:],
        )
        return y


def _cell_for(
    extractor: BaseFeaturesExtractor, cell: str, hidden_size: Any, cell_kwargs: dict[str, Any]
) -> RecurrentModule:
    """A new cell for the features of ``extractor`` (Δt last for an ElapsedTimeExtractor)."""
    time_in_features = isinstance(extractor, ElapsedTimeExtractor)
    features = extractor.features_dim - int(time_in_features)
    input_size = cell_input_size(cell, features, time_in_features)
    # A wiring is built for the cell it is given to: each cell gets its own copy.
    units = hidden_size if isinstance(hidden_size, int) else copy.deepcopy(hidden_size)
    return make_cell(cell, input_size, units, **cell_kwargs)


class RecurrentActor(_CellMixin, Actor):
    """SAC's actor with a cell between the features extractor and the MLP.

    ``latent_pi``, ``mu``, ``log_std`` and ``action_dist`` are SB3's (``features_dim`` is the
    cell's output size here). What an exporter reads:

    - ``cell``: the :class:`~cfc_rl.nn.RecurrentModule`; ``state_size``: its flat state size;
    - ``time_in_features``: the features extractor appends Δt as its last feature (an
      :class:`~cfc_rl.sb3.ElapsedTimeExtractor`); :meth:`split_time` separates it;
    - :meth:`step`: one control step ``(features, state, dt, episode_start) -> (action,
      new_state)``, the action in ``[-1, 1]`` (``tanh`` of the mean when deterministic), to be
      rescaled to the action space as ``policy.unscale_action`` does.

    :param cell: the cell, built for the extractor's features (:func:`cfc_rl.nn.cell_input_size`)
    :param features_dim: the features extractor's output size
    The other parameters are those of SB3's ``Actor``; gSDE is not supported.
    """

    def __init__(
        self,
        observation_space: spaces.Space,
        action_space: spaces.Box,
        net_arch: list[int],
        features_extractor: BaseFeaturesExtractor,
        features_dim: int,
        cell: RecurrentModule,
        activation_fn: type[nn.Module] = nn.ReLU,
        use_sde: bool = False,
        log_std_init: float = -3,
        full_std: bool = True,
        use_expln: bool = False,
        clip_mean: float = 2.0,
        normalize_images: bool = True,
    ) -> None:
        if use_sde:
            raise ValueError("RecurrentActor does not support gSDE (use_sde=True)")
        super().__init__(
            observation_space,
            action_space,
            net_arch,
            features_extractor,
            cell.output_size,
            activation_fn=activation_fn,
            use_sde=False,
            log_std_init=log_std_init,
            full_std=full_std,
            use_expln=use_expln,
            clip_mean=clip_mean,
            normalize_images=normalize_images,
        )
        self.cell = cell
        self.time_in_features = isinstance(features_extractor, ElapsedTimeExtractor)
        self.extractor_dim = features_dim

    @property
    def state_size(self) -> int:
        """Size of the flat state carried between steps (the actor cell's)."""
        return self.cell.state_size

    def distribution_params(self, latent: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and clamped log-std of the Gaussian before ``tanh``, from cell outputs of any
        leading shape (SB3's ``Actor.get_action_dist_params`` after its features)."""
        latent_pi = self.latent_pi(latent)
        log_std = torch.clamp(self.log_std(latent_pi), LOG_STD_MIN, LOG_STD_MAX)  # type: ignore[operator]
        return self.mu(latent_pi), log_std

    def step(
        self,
        features: Tensor,
        state: Tensor,
        dt: Tensor | None,
        episode_start: Tensor,
        deterministic: bool = True,
    ) -> tuple[Tensor, Tensor]:
        """One control step of a batch of environments.

        :param features: ``(N, F)``, the features extractor's output without Δt
            (:meth:`split_time`)
        :param state: ``(N, state_size)``, the state after the previous step
        :param dt: ``(N,)`` or ``(N, 1)`` elapsed time of this step, or None (no Δt reported)
        :param episode_start: ``(N,)``, True/1.0 where this is an episode's first step (the
            state is zeroed before the step)
        :param deterministic: ``tanh`` of the mean; else a sample of the squashed Gaussian
        :return: the action in ``[-1, 1]`` ``(N, action_dim)`` and the new state
        """
        dtype = next(self.cell.parameters()).dtype
        x = features.to(dtype).unsqueeze(1)
        if dt is not None:
            dt = dt.reshape(-1, 1).to(dtype)
        x, timespans = time_input(self.cell, x, dt)
        resets = episode_start.reshape(-1, 1) > 0.5
        y, new_state = self.cell(x, state.to(dtype), timespans=timespans, resets=resets)
        mean, log_std = self.distribution_params(y[:, 0])
        action = self.action_dist.actions_from_params(mean, log_std, deterministic=deterministic)
        return action, new_state

    def act(
        self,
        observation: PyTorchObs,
        state: Tensor,
        episode_start: Tensor,
        deterministic: bool = False,
    ) -> tuple[Tensor, Tensor]:
        """:meth:`step` from observations (as ``obs_to_tensor`` returns them)."""
        features, dt = self.split_time(self.extract_features(observation, self.features_extractor))
        return self.step(features, state, dt, episode_start, deterministic=deterministic)

    def forward(  # type: ignore[override]
        self,
        obs: PyTorchObs,
        state: Tensor | None = None,
        episode_start: Tensor | None = None,
        deterministic: bool = False,
    ) -> tuple[Tensor, Tensor]:
        """:meth:`act` with zeros for a missing state (an episode's first step)."""
        features, dt = self.split_time(self.extract_features(obs, self.features_extractor))
        batch = features.shape[0]
        if state is None:
            state = self.cell.initial_state(batch, device=features.device)
        if episode_start is None:
            episode_start = torch.zeros(batch, device=features.device)
        return self.step(features, state, dt, episode_start, deterministic=deterministic)

    def sequence_distribution(
        self, observations: PyTorchObs, valid: Tensor, burn_in: int
    ) -> tuple[Tensor, Tensor]:
        """Gaussian parameters at every position after the burn-in of padded sequences.

        :param observations: ``(B, T, ...)`` (a dict of them for Dict observations)
        :param valid: ``(B, T)`` bool
        :param burn_in: K
        :return: mean and log-std, each ``(B, T - K, action_dim)``
        """
        features = self.sequence_features(observations, valid)
        return self.distribution_params(self.run_cell(self.cell, features, valid, burn_in))

    def sample_actions(
        self, mean: Tensor, log_std: Tensor, noise: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Reparameterised squashed-Gaussian actions and their log-probabilities (SB3's
        ``SquashedDiagGaussianDistribution``) for parameters ``(..., action_dim)``.

        :param noise: standard normal draws of the same shape (drawn when None)
        :return: actions ``(..., action_dim)`` in ``(-1, 1)`` and log-probabilities ``(...)``
        """
        if noise is None:
            noise = torch.randn_like(mean)
        shape = mean.shape
        mean, log_std, noise = (t.reshape(-1, shape[-1]) for t in (mean, log_std, noise))
        gaussian = mean + log_std.exp() * noise
        actions = torch.tanh(gaussian)
        log_prob = self.action_dist.proba_distribution(mean, log_std).log_prob(actions, gaussian)
        return actions.reshape(shape), log_prob.reshape(shape[:-1])

    def get_action_dist_params(self, obs: PyTorchObs) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        raise NotImplementedError(
            "a RecurrentActor needs the history: use sequence_distribution(observations, valid, "
            "burn_in) or step(features, state, dt, episode_start)"
        )

    def action_log_prob(self, obs: PyTorchObs) -> tuple[Tensor, Tensor]:
        return self.get_action_dist_params(obs)  # type: ignore[return-value]  (raises)


class RecurrentCritic(_CellMixin, ContinuousCritic):
    """Twin critics over observation histories: one features extractor, then per critic its
    own cell and ``Q = MLP([cell output, action])`` (``qf0``, ``qf1``: SB3's heads, built on
    the cell's output size; the cells are ``cells[i]``).

    :param cells: one cell per critic, built for the extractor's features
    :param features_dim: the features extractor's output size
    The other parameters are those of SB3's ``ContinuousCritic``.
    """

    def __init__(
        self,
        observation_space: spaces.Space,
        action_space: spaces.Box,
        net_arch: list[int],
        features_extractor: BaseFeaturesExtractor,
        features_dim: int,
        cells: list[RecurrentModule],
        activation_fn: type[nn.Module] = nn.ReLU,
        normalize_images: bool = True,
        n_critics: int = 2,
        share_features_extractor: bool = True,
    ) -> None:
        if len(cells) != n_critics:
            raise ValueError(f"got {len(cells)} cells for {n_critics} critics")
        super().__init__(
            observation_space,
            action_space,
            net_arch,
            features_extractor,
            cells[0].output_size,
            activation_fn=activation_fn,
            normalize_images=normalize_images,
            n_critics=n_critics,
            share_features_extractor=share_features_extractor,
        )
        self.cells = nn.ModuleList(cells)
        self.time_in_features = isinstance(features_extractor, ElapsedTimeExtractor)
        self.extractor_dim = features_dim

    def latents(
        self, observations: PyTorchObs, valid: Tensor, burn_in: int, steps: int | None = None
    ) -> list[Tensor]:
        """Each critic cell's outputs ``(B, steps, output_size)`` after the burn-in (see
        :meth:`run_cell`). A features extractor shared with the actor gets no gradient here
        (it learns from the actor's loss, as in SB3)."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.share_features_extractor):
            features = self.sequence_features(observations, valid)
        return [self.run_cell(cell, features, valid, burn_in, steps) for cell in self.cells]

    def q_values(self, latents: list[Tensor], actions: Tensor) -> list[Tensor]:
        """``Q_i`` ``(B, T)`` of each critic for its cell outputs ``(B, T, out)`` and actions
        ``(B, T, action_dim)``."""
        actions = actions.to(latents[0].dtype)
        return [
            q_net(torch.cat([latent, actions], dim=-1)).squeeze(-1)
            for latent, q_net in zip(latents, self.q_networks, strict=True)
        ]

    def forward(  # type: ignore[override]
        self, observations: PyTorchObs, actions: Tensor, valid: Tensor, burn_in: int
    ) -> tuple[Tensor, ...]:
        """Q-values ``(B, L)`` of each critic for actions ``(B, L, action_dim)`` at the ``L``
        positions after the burn-in."""
        steps = actions.shape[1]
        return tuple(self.q_values(self.latents(observations, valid, burn_in, steps), actions))

    def q1_forward(self, obs: Tensor, actions: Tensor) -> Tensor:
        raise NotImplementedError("a RecurrentCritic needs the history: use forward or latents")


class RecurrentSACPolicy(SACPolicy):
    """SAC's policy with recurrent actor and critics, for :class:`~cfc_rl.sb3.RecurrentSAC`
    (its ``"MlpPolicy"`` and ``"MultiInputPolicy"``).

    Attributes an exporter uses: ``actor`` (a :class:`RecurrentActor`: ``actor.cell``,
    ``actor.state_size``, ``actor.time_in_features``, ``actor.split_time``, ``actor.step``),
    ``actor.features_extractor``, ``state_size`` (the state ``predict`` carries, shape
    ``(n_envs, state_size)``), ``scale_action``/``unscale_action`` (SB3's mapping between
    ``[-1, 1]`` and the action space).

    :param observation_space: observation space
    :param action_space: action space (a Box)
    :param lr_schedule: learning-rate schedule
    :param net_arch: the MLP after the cell, as SAC's: a list for actor and critics, or
        ``dict(pi=[...], qf=[...])``; :data:`DEFAULT_NET_ARCH` when None
    :param activation_fn: activation of the MLPs
    :param use_sde: must be False (gSDE is not supported)
    :param log_std_init: SB3's parameter (unused without gSDE)
    :param use_expln: SB3's parameter (unused without gSDE)
    :param clip_mean: SB3's parameter (unused without gSDE)
    :param features_extractor_class: defaults to :class:`~cfc_rl.sb3.ElapsedTimeExtractor` for
        Dict observations with a ``"dt"`` entry, ``CombinedExtractor`` for other Dicts and
        ``FlattenExtractor`` otherwise (as :class:`~cfc_rl.sb3.RecurrentCellPolicy`)
    :param features_extractor_kwargs: passed to it
    :param normalize_images: SB3's parameter
    :param optimizer_class: optimizer of actor and critics
    :param optimizer_kwargs: its arguments besides the learning rate
    :param n_critics: number of critics, each with its own cell
    :param share_features_extractor: the critics use the actor's features extractor (trained
        by the actor's loss only); the cells are never shared
    :param cell: a name of :data:`cfc_rl.nn.CELLS`
    :param hidden_size: hidden units of each cell (or a wiring, for CfC and LTC)
    :param cell_kwargs: passed to every cell (``backbone_units``, ``mixed_memory``,
        ``ode_unfolds``, ``solver``...)
    """

    actor: RecurrentActor
    critic: RecurrentCritic
    critic_target: RecurrentCritic

    def __init__(
        self,
        observation_space: spaces.Space,
        action_space: spaces.Box,
        lr_schedule: Schedule,
        net_arch: list[int] | dict[str, list[int]] | None = None,
        activation_fn: type[nn.Module] = nn.ReLU,
        use_sde: bool = False,
        log_std_init: float = -3,
        use_expln: bool = False,
        clip_mean: float = 2.0,
        features_extractor_class: type[BaseFeaturesExtractor] | None = None,
        features_extractor_kwargs: dict[str, Any] | None = None,
        normalize_images: bool = True,
        optimizer_class: type[torch.optim.Optimizer] = torch.optim.Adam,
        optimizer_kwargs: dict[str, Any] | None = None,
        n_critics: int = 2,
        share_features_extractor: bool = False,
        cell: str = "cfc",
        hidden_size: Any = 64,
        **cell_kwargs: Any,
    ) -> None:
        if use_sde:
            raise ValueError("RecurrentSACPolicy does not support gSDE (use_sde=True)")
        if features_extractor_class is None:
            features_extractor_class = default_extractor_class(observation_space)
        # Read by make_actor/make_critic, which SACPolicy.__init__ calls.
        self.cell_name = cell
        self.hidden_size = hidden_size
        self.cell_kwargs = cell_kwargs
        super().__init__(
            observation_space,
            action_space,
            lr_schedule,
            net_arch=list(DEFAULT_NET_ARCH) if net_arch is None else net_arch,
            activation_fn=activation_fn,
            use_sde=False,
            log_std_init=log_std_init,
            use_expln=use_expln,
            clip_mean=clip_mean,
            features_extractor_class=features_extractor_class,
            features_extractor_kwargs=features_extractor_kwargs,
            normalize_images=normalize_images,
            optimizer_class=optimizer_class,
            optimizer_kwargs=optimizer_kwargs,
            n_critics=n_critics,
            share_features_extractor=share_features_extractor,
        )

    def _make_cell(self, extractor: BaseFeaturesExtractor) -> RecurrentModule:
        return _cell_for(extractor, self.cell_name, self.hidden_size, self.cell_kwargs)

    def make_actor(self, features_extractor: BaseFeaturesExtractor | None = None) -> RecurrentActor:
        kwargs = self._update_features_extractor(self.actor_kwargs, features_extractor)
        cell = self._make_cell(kwargs["features_extractor"])
        return RecurrentActor(**kwargs, cell=cell).to(self.device)

    def make_critic(
        self, features_extractor: BaseFeaturesExtractor | None = None
    ) -> RecurrentCritic:
        kwargs = self._update_features_extractor(self.critic_kwargs, features_extractor)
        cells = [self._make_cell(kwargs["features_extractor"]) for _ in range(kwargs["n_critics"])]
        return RecurrentCritic(**kwargs, cells=cells).to(self.device)

    @property
    def state_size(self) -> int:
        """Size of the state ``predict`` carries per environment (the actor cell's)."""
        return self.actor.state_size

    @property
    def time_key(self) -> str | None:
        """The observation key read as Δt, or None."""
        extractor = self.actor.features_extractor
        return extractor.time_key if isinstance(extractor, ElapsedTimeExtractor) else None

    def _get_constructor_parameters(self) -> dict[str, Any]:
        data = super()._get_constructor_parameters()
        data.update(
            cell=self.cell_name,
            hidden_size=self.hidden_size,
            share_features_extractor=self.share_features_extractor,
            **self.cell_kwargs,
        )
        return data

    def _predict(self, observation: PyTorchObs, deterministic: bool = False) -> Tensor:
        # The action of an episode's first step (no state): predict() carries the state.
        action, _ = self.actor(observation, deterministic=deterministic)
        return action

    def predict(  # type: ignore[override]
        self,
        observation: np.ndarray | dict[str, np.ndarray],
        state: np.ndarray | None = None,
        episode_start: np.ndarray | None = None,
        deterministic: bool = False,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The action for one step of each environment, and the state after it (the interface
        of RecurrentPPO's ``predict``, so that SB3's ``evaluate_policy`` carries the state).

        :param observation: a batch of observations ``(n_envs, ...)`` (or one, unbatched)
        :param state: ``(n_envs, state_size)``, the state returned by the previous call;
            zeros when None
        :param episode_start: ``(n_envs,)``, True where the observation starts an episode
            (the state is zeroed first); no resets when None
        :param deterministic: the mean action (``tanh`` of the Gaussian mean)
        :return: actions rescaled to the action space, and the new state (float32 numpy)
        """
        self.set_training_mode(False)
        obs_tensor, vectorized_env = self.obs_to_tensor(observation)
        first = obs_tensor[next(iter(obs_tensor))] if isinstance(obs_tensor, dict) else obs_tensor
        n_envs = first.shape[0]
        with torch.no_grad():
            if state is None:
                state_tensor = self.actor.cell.initial_state(n_envs, device=self.device)
            else:
                state_tensor = torch.as_tensor(np.asarray(state), device=self.device)
                state_tensor = state_tensor.reshape(n_envs, -1).to(torch.float32)
            if episode_start is None:
                starts = torch.zeros(n_envs, device=self.device)
            else:
                starts = torch.as_tensor(np.asarray(episode_start, dtype=np.float32))
                starts = starts.reshape(n_envs).to(self.device)
            actions, new_state = self.actor.act(
                obs_tensor, state_tensor, starts, deterministic=deterministic
            )
        actions_np = actions.cpu().numpy().reshape((-1, *self.action_space.shape))  # type: ignore[misc]
        actions_np = self.unscale_action(actions_np)
        if not vectorized_env:
            actions_np = actions_np.squeeze(axis=0)
        return actions_np, new_state.cpu().numpy()
