"""A stateful recurrent policy for the unmodified ``sb3_contrib.RecurrentPPO``.

``RecurrentPPO(RecurrentCellPolicy, env, policy_kwargs=dict(cell="cfc", hidden_size=64))``
swaps sb3-contrib's LSTM for any cell of :mod:`cfc_rl.nn`. The state carries across the
whole episode and is reset at episode starts. Training minibatches (padded sequences that
start at episode boundaries) run through the cell in one call with ``resets``, where
sb3-contrib's own policy falls back to a Python loop over time steps.
"""

from __future__ import annotations

from typing import Any

import torch
from gymnasium import spaces
from sb3_contrib.common.recurrent.policies import RecurrentActorCriticPolicy
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor, MlpExtractor
from stable_baselines3.common.type_aliases import Schedule
from torch import Tensor, nn

from cfc_rl.nn import RecurrentModule, cell_input_size, make_cell, time_input
from cfc_rl.sb3.extractors import ElapsedTimeExtractor, default_extractor_class


class PolicyCell(nn.Module):
    """A cell as RecurrentPPO sees it: one "layer" whose hidden state is the cell's whole
    flat state (RecurrentPPO sizes its buffers from ``num_layers`` and ``hidden_size``; the
    LSTM cell-state slot of its ``(h, c)`` pairs is carried along unused).

    :param cell: the recurrent module, built for the features by
        :func:`cfc_rl.nn.cell_input_size`
    :param time_in_features: the last feature is the elapsed time Δt (from an
        :class:`ElapsedTimeExtractor`); :func:`cfc_rl.nn.time_input` gives it to the cell
    """

    num_layers = 1

    def __init__(self, cell: RecurrentModule, time_in_features: bool) -> None:
        super().__init__()
        self.cell = cell
        self.time_in_features = time_in_features
        # The features: the cell's inputs other than Δt, then Δt itself when it is reported.
        dt_inputs = cell_input_size(cell, 0, time_in_features)  # the cell's inputs that are Δt
        self.input_size = cell.input_size - dt_inputs + int(time_in_features)
        self.hidden_size = cell.state_size
        self.output_size = cell.output_size

    def forward(
        self, features: Tensor, states: tuple[Tensor, Tensor], episode_starts: Tensor
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """Run padded sequences in one call.

        :param features: ``(n_seq * T, input_size)``, sequence by sequence
        :param states: ``(h, c)``, each ``(1, n_seq, state_size)``: the state before each
            sequence (only ``h`` is used)
        :param episode_starts: ``(n_seq * T,)``, 1.0 where an episode starts
        :return: outputs ``(n_seq * T, output_size)`` and the new ``(h, c)``
        """
        hidden, unused = states
        n_seq = hidden.shape[1]
        x = features.reshape(n_seq, -1, self.input_size)
        dt = None
        if self.time_in_features:
            x, dt = x[..., :-1], x[..., -1]
        x, timespans = time_input(self.cell, x, dt)
        resets = episode_starts.reshape(n_seq, -1) > 0.5
        y, final = self.cell(x, hidden[0], timespans=timespans, resets=resets)
        return y.reshape(-1, self.output_size), (final.unsqueeze(0), unused)


class RecurrentCellPolicy(RecurrentActorCriticPolicy):
    """Actor-critic policy with any cell of :data:`cfc_rl.nn.CELLS` (CfC, LTC, CT-RNN, LSTM,
    GRU...), for ``sb3_contrib.RecurrentPPO``.

    Features → cell → MLP heads, with a separate critic cell by default, as RecurrentPPO's
    ``MlpLstmPolicy``. Observations that report elapsed time (a Dict with ``"dt"``, as
    ``cfc_rl.envs.IrregularTime`` produces) give Δt to the cell as ``timespans``; LSTM and GRU
    get it as an input feature.

    :param observation_space: observation space
    :param action_space: action space
    :param lr_schedule: learning-rate schedule
    :param net_arch: MLP after the cell (see ``MlpLstmPolicy``)
    :param activation_fn: activation of that MLP
    :param cell: a name of :data:`cfc_rl.nn.CELLS`
    :param hidden_size: hidden units of the cell (or a wiring, for CfC and LTC)
    :param shared_cell: the critic reuses the actor's cell (without back-propagating into it)
    :param enable_critic_cell: the critic has its own cell (default); with both False the
        critic is a linear layer on the features
    :param features_extractor_class: defaults to :class:`ElapsedTimeExtractor` for Dict
        observations with a ``"dt"`` entry, ``CombinedExtractor`` for other Dicts and
        ``FlattenExtractor`` otherwise
    :param cell_kwargs: passed to the cell (``backbone_units``, ``solver``, ``mixed_memory``...)
    The other parameters are those of ``ActorCriticPolicy``.
    """

    def __init__(
        self,
        observation_space: spaces.Space,
        action_space: spaces.Space,
        lr_schedule: Schedule,
        net_arch: list[int] | dict[str, list[int]] | None = None,
        activation_fn: type[nn.Module] = nn.Tanh,
        ortho_init: bool = True,
        use_sde: bool = False,
        log_std_init: float = 0.0,
        full_std: bool = True,
        use_expln: bool = False,
        squash_output: bool = False,
        features_extractor_class: type[BaseFeaturesExtractor] | None = None,
        features_extractor_kwargs: dict[str, Any] | None = None,
        share_features_extractor: bool = True,
        normalize_images: bool = True,
        optimizer_class: type[torch.optim.Optimizer] = torch.optim.Adam,
        optimizer_kwargs: dict[str, Any] | None = None,
        cell: str = "cfc",
        hidden_size: Any = 64,
        shared_cell: bool = False,
        enable_critic_cell: bool = True,
        **cell_kwargs: Any,
    ) -> None:
        if shared_cell and enable_critic_cell:
            raise ValueError(
                "shared_cell=True needs enable_critic_cell=False: choose a shared cell, a "
                "separate critic cell, or none for the critic"
            )
        if shared_cell and not share_features_extractor:
            raise ValueError("shared_cell=True needs share_features_extractor=True")
        if features_extractor_class is None:
            features_extractor_class = default_extractor_class(observation_space)
        self.cell_name = cell
        self.hidden_size = hidden_size
        self.cell_kwargs = cell_kwargs
        self.shared_lstm = shared_cell
        self.enable_critic_lstm = enable_critic_cell
        # RecurrentActorCriticPolicy.__init__ would build nn.LSTM modules; its parent builds
        # everything else and calls _build_mlp_extractor, where the cells are made. What that
        # skipped __init__ sets and the rest of sb3-contrib reads (shared_lstm,
        # enable_critic_lstm here; lstm_actor, lstm_critic, lstm_output_dim,
        # lstm_hidden_state_shape, critic in _build_mlp_extractor; _process_sequence) is
        # re-created under its private names: tests/test_sb3_recurrent.py checks the list
        # against the installed sb3-contrib.
        ActorCriticPolicy.__init__(
            self,
            observation_space,
            action_space,
            lr_schedule,
            net_arch,
            activation_fn,
            ortho_init,
            use_sde,
            log_std_init,
            full_std,
            use_expln,
            squash_output,
            features_extractor_class,
            features_extractor_kwargs,
            share_features_extractor,
            normalize_images,
            optimizer_class,
            optimizer_kwargs,
        )

    def _make_cell(self) -> PolicyCell:
        # An ElapsedTimeExtractor puts Δt last among the features.
        time_in_features = isinstance(self.pi_features_extractor, ElapsedTimeExtractor)
        features = self.features_dim - int(time_in_features)
        input_size = cell_input_size(self.cell_name, features, time_in_features)
        module = make_cell(self.cell_name, input_size, self.hidden_size, **self.cell_kwargs)
        return PolicyCell(module, time_in_features)

    def _build_mlp_extractor(self) -> None:
        self.lstm_actor = self._make_cell()
        self.lstm_critic = self._make_cell() if self.enable_critic_lstm else None
        self.lstm_output_dim = self.lstm_actor.output_size
        # predict() starts from zeros of this shape, one per environment.
        self.lstm_hidden_state_shape = (1, 1, self.lstm_actor.hidden_size)
        self.critic = None
        if not (self.shared_lstm or self.enable_critic_lstm):
            self.critic = nn.Linear(self.features_dim, self.lstm_output_dim)
        self.mlp_extractor = MlpExtractor(
            self.lstm_output_dim,
            net_arch=self.net_arch,
            activation_fn=self.activation_fn,
            device=self.device,
        )

    @staticmethod
    def _process_sequence(
        features: Tensor,
        lstm_states: tuple[Tensor, Tensor],
        episode_starts: Tensor,
        lstm: PolicyCell,
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        return lstm(features, lstm_states, episode_starts)

    def _get_constructor_parameters(self) -> dict[str, Any]:
        data = super()._get_constructor_parameters()
        data.update(
            cell=self.cell_name,
            hidden_size=self.hidden_size,
            shared_cell=self.shared_lstm,
            enable_critic_cell=self.enable_critic_lstm,
            share_features_extractor=self.share_features_extractor,
            **self.cell_kwargs,
        )
        return data
