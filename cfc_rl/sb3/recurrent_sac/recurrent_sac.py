"""Recurrent Soft Actor-Critic: SB3's SAC whose actor and twin critics each run a cell of
:mod:`cfc_rl.nn` over the episode, trained on sequences from a replay buffer with a burn-in
(R2D2, Kapturowski et al. 2019)."""

from __future__ import annotations

import io
import pathlib
from typing import Any, ClassVar, NamedTuple, TypeVar

import numpy as np
import torch
from gymnasium import spaces
from stable_baselines3 import SAC
from stable_baselines3.common.buffers import ReplayBuffer
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.noise import ActionNoise
from stable_baselines3.common.policies import BasePolicy
from stable_baselines3.common.save_util import load_from_pkl
from stable_baselines3.common.type_aliases import GymEnv, MaybeCallback, Schedule
from stable_baselines3.common.utils import polyak_update
from torch import Tensor

from cfc_rl.sb3.recurrent_sac.buffers import (
    DictSequenceReplayBuffer,
    SequenceReplayBuffer,
    SequenceReplayBufferSamples,
)
from cfc_rl.sb3.recurrent_sac.policies import RecurrentActor, RecurrentCritic, RecurrentSACPolicy

__all__ = ["RecurrentSAC", "SequenceLosses", "masked_mean"]

SelfRecurrentSAC = TypeVar("SelfRecurrentSAC", bound="RecurrentSAC")


class SequenceLosses(NamedTuple):
    """The losses of one gradient step, all computed from the same parameters.

    :param critic_loss: ``0.5 · Σ_critics mean (Q_i - target)²`` over the valid transitions
    :param actor_loss: ``mean (α · log π(a|h) - min_i Q_i(h, a))``, ``a ~ π`` (reparameterised)
    :param ent_coef_loss: ``-mean log α · (log π + target_entropy)``, None for a fixed α
    :param ent_coef: α, detached
    """

    critic_loss: Tensor
    actor_loss: Tensor
    ent_coef_loss: Tensor | None
    ent_coef: Tensor


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values`` where ``mask`` is True: every valid transition of the batch weighs
    the same. ``torch.where``, so that NaN or inf at masked positions has no effect (on the
    value or the gradient)."""
    total = torch.where(mask, values, values.new_zeros(())).sum()
    return total / mask.sum().clamp(min=1).to(values.dtype)


class RecurrentSAC(SAC):
    """Soft Actor-Critic with recurrent actor and critics (cells of :mod:`cfc_rl.nn`).

    ``RecurrentSAC("MlpPolicy", env, policy_kwargs=dict(cell="cfc", hidden_size=64,
    backbone_units=64))``. SB3's SAC otherwise: entropy tuning, polyak target updates,
    logging, save/load are its own. What changes:

    - rollouts carry the actor's state per environment and zero it at each episode start,
      during the random warm-up (``learning_starts``) too, so that the policy takes over
      with the state of the current episode;
    - the replay buffer (:class:`SequenceReplayBuffer`, or :class:`DictSequenceReplayBuffer`
      for Dict observations) keeps SB3's ring of ``buffer_size`` transitions and samples
      sequences of ``sequence_length`` transitions inside one episode, each after ``burn_in``
      earlier steps of that episode that only warm up the cells' state (without gradient);
    - a gradient step computes the three losses (:meth:`sequence_losses`) from the same
      parameters, one critic pass serving both the critic's and the actor's loss, then steps
      the three optimizers (SB3's SAC evaluates the actor's loss with the critic after its
      step, which would cost one more pass of both critic cells);
    - :meth:`predict` takes and returns the state as RecurrentPPO's does (a
      ``(n_envs, state_size)`` array here), so SB3's ``evaluate_policy`` works unchanged.

    Δt: Dict observations with ``"dt"`` (``cfc_rl.envs.IrregularTime``) give the cells the
    elapsed time of each step, raw. With a ``VecNormalize``, normalise the other keys only
    (``norm_obs_keys=["obs"]``); ``learn`` refuses a ``VecNormalize`` that normalises Δt.

    :param policy: ``"MlpPolicy"``, ``"MultiInputPolicy"`` (Dict observations) or a
        :class:`RecurrentSACPolicy` subclass; ``policy_kwargs`` take ``cell``,
        ``hidden_size`` and the cell's arguments (see :class:`RecurrentSACPolicy`)
    :param env: the environment (a Box action space)
    :param learning_rate: learning rate of actor, critics and entropy coefficient
    :param buffer_size: the most transitions the replay buffer keeps (all environments)
    :param learning_starts: environment steps of uniform random actions before training
    :param batch_size: the number of *sequences* per gradient step; a step sees up to
        ``batch_size × sequence_length`` transitions (fewer where sequences reach their
        episode's end)
    :param tau: polyak coefficient of the target critics
    :param gamma: discount factor
    :param train_freq: SB3's: update every ``train_freq`` steps (or ``(n, "episode")``)
    :param gradient_steps: gradient steps per update (-1: as many as environment steps)
    :param action_noise: SB3's optional extra action noise
    :param replay_buffer_class: a :class:`SequenceReplayBuffer` or
        :class:`DictSequenceReplayBuffer` (sub)class; chosen from the observation space when
        None
    :param replay_buffer_kwargs: more arguments of the buffer (``handle_timeout_termination``)
    :param sequence_length: L, the transitions of each sampled sequence that the losses use
    :param burn_in: K, earlier steps of the same episode that only warm up the state (R2D2);
        0 starts every sequence from a zero state
    :param ent_coef: SB3's entropy coefficient (``"auto"``, ``"auto_0.1"`` or a number)
    :param target_update_interval: gradient steps between target updates
    :param target_entropy: target entropy of the ``"auto"`` coefficient
    :param stats_window_size: episodes averaged in the rollout logs
    :param tensorboard_log: TensorBoard folder
    :param policy_kwargs: arguments of the policy
    :param verbose: SB3's verbosity
    :param seed: random seed
    :param device: torch device
    :param _init_setup_model: build the networks now
    """

    policy_aliases: ClassVar[dict[str, type[BasePolicy]]] = {
        "MlpPolicy": RecurrentSACPolicy,
        "MultiInputPolicy": RecurrentSACPolicy,
    }
    policy: RecurrentSACPolicy
    actor: RecurrentActor
    critic: RecurrentCritic
    critic_target: RecurrentCritic
    replay_buffer: SequenceReplayBuffer | DictSequenceReplayBuffer  # type: ignore[assignment]

    def __init__(
        self,
        policy: str | type[RecurrentSACPolicy],
        env: GymEnv | str,
        learning_rate: float | Schedule = 3e-4,
        buffer_size: int = 1_000_000,
        learning_starts: int = 100,
        batch_size: int = 32,
        tau: float = 0.005,
        gamma: float = 0.99,
        train_freq: int | tuple[int, str] = 1,
        gradient_steps: int = 1,
        action_noise: ActionNoise | None = None,
        replay_buffer_class: type[ReplayBuffer] | None = None,
        replay_buffer_kwargs: dict[str, Any] | None = None,
        sequence_length: int = 32,
        burn_in: int = 8,
        ent_coef: str | float = "auto",
        target_update_interval: int = 1,
        target_entropy: str | float = "auto",
        stats_window_size: int = 100,
        tensorboard_log: str | None = None,
        policy_kwargs: dict[str, Any] | None = None,
        verbose: int = 0,
        seed: int | None = None,
        device: torch.device | str = "auto",
        _init_setup_model: bool = True,
    ) -> None:
        if sequence_length < 1 or burn_in < 0:
            raise ValueError(
                f"sequence_length must be >= 1 and burn_in >= 0, got {sequence_length} and "
                f"{burn_in}"
            )
        self.sequence_length = sequence_length
        self.burn_in = burn_in
        # The actor's state after the last step of each environment (None: zeros).
        self._last_actor_state: np.ndarray | None = None
        super().__init__(
            policy,
            env,
            learning_rate=learning_rate,
            buffer_size=buffer_size,
            learning_starts=learning_starts,
            batch_size=batch_size,
            tau=tau,
            gamma=gamma,
            train_freq=train_freq,
            gradient_steps=gradient_steps,
            action_noise=action_noise,
            replay_buffer_class=replay_buffer_class,
            replay_buffer_kwargs=replay_buffer_kwargs,
            optimize_memory_usage=False,
            n_steps=1,
            ent_coef=ent_coef,
            target_update_interval=target_update_interval,
            target_entropy=target_entropy,
            use_sde=False,
            stats_window_size=stats_window_size,
            tensorboard_log=tensorboard_log,
            policy_kwargs=policy_kwargs,
            verbose=verbose,
            seed=seed,
            device=device,
            _init_setup_model=_init_setup_model,
        )

    def _setup_model(self) -> None:
        if self.replay_buffer_class is None:
            if isinstance(self.observation_space, spaces.Dict):
                self.replay_buffer_class = DictSequenceReplayBuffer
            else:
                self.replay_buffer_class = SequenceReplayBuffer
        if not issubclass(
            self.replay_buffer_class, (SequenceReplayBuffer, DictSequenceReplayBuffer)
        ):
            raise ValueError(
                "RecurrentSAC trains on sequences: replay_buffer_class must be a "
                "SequenceReplayBuffer or DictSequenceReplayBuffer (sub)class, got "
                f"{self.replay_buffer_class.__name__}"
            )
        for key, value in (("sequence_length", self.sequence_length), ("burn_in", self.burn_in)):
            if self.replay_buffer_kwargs.get(key, value) != value:
                raise ValueError(
                    f"replay_buffer_kwargs[{key!r}]={self.replay_buffer_kwargs[key]!r} differs "
                    f"from {key}={value!r}: set it once, as RecurrentSAC's {key}"
                )
        self.replay_buffer_kwargs = {
            **self.replay_buffer_kwargs,
            "sequence_length": self.sequence_length,
            "burn_in": self.burn_in,
        }
        super()._setup_model()

    # Rollouts: the actor's state per environment --------------------------------------------

    def _setup_learn(
        self,
        total_timesteps: int,
        callback: MaybeCallback = None,
        reset_num_timesteps: bool = True,
        tb_log_name: str = "run",
        progress_bar: bool = False,
    ) -> tuple[int, BaseCallback]:
        # Before SB3's setup, which resets the environments and creates the logger's folder.
        self._check_time_is_raw()
        env_is_reset = reset_num_timesteps or self._last_obs is None
        result = super()._setup_learn(
            total_timesteps, callback, reset_num_timesteps, tb_log_name, progress_bar
        )
        if env_is_reset:
            # SB3 resets the environments without a done: the episodes in the buffer end here
            # (their last transitions bootstrap, as truncations), the states start from zeros.
            self._last_actor_state = None
            self.replay_buffer.start_new_episodes()
        return result

    def _check_time_is_raw(self) -> None:
        key = self.policy.time_key
        venv = self._vec_normalize_env
        if key is None or venv is None or not venv.norm_obs:
            return
        if key in (getattr(venv, "norm_obs_keys", None) or ()):
            raise ValueError(
                f"the VecNormalize normalises {key!r}, the elapsed time the cells read in "
                f"seconds: build it with the other keys only, e.g. VecNormalize(env, "
                f"norm_obs_keys={[k for k in venv.norm_obs_keys if k != key]!r})"
            )

    def _sample_action(
        self,
        learning_starts: int,
        action_noise: ActionNoise | None = None,
        n_envs: int = 1,
    ) -> tuple[np.ndarray, np.ndarray]:
        """SB3's ``_sample_action`` with the actor's state carried: the actor runs at every
        step, warm-up included (where its action is replaced by a uniform one), so that its
        state follows each episode from the start."""
        assert self._last_obs is not None, "self._last_obs was not set"
        unscaled_action, self._last_actor_state = self.policy.predict(
            self._last_obs,
            state=self._last_actor_state,
            episode_start=self._last_episode_starts,
            deterministic=False,
        )
        if self.num_timesteps < learning_starts:
            unscaled_action = np.array([self.action_space.sample() for _ in range(n_envs)])
        scaled_action = self.policy.scale_action(unscaled_action)
        if action_noise is not None:
            scaled_action = np.clip(scaled_action + action_noise(), -1, 1)
        return self.policy.unscale_action(scaled_action), scaled_action

    def _store_transition(
        self,
        replay_buffer: ReplayBuffer,
        buffer_action: np.ndarray,
        new_obs: np.ndarray | dict[str, np.ndarray],
        reward: np.ndarray,
        dones: np.ndarray,
        infos: list[dict[str, Any]],
    ) -> None:
        super()._store_transition(replay_buffer, buffer_action, new_obs, reward, dones, infos)
        # The VecEnv has reset the environments that are done: their next step starts anew.
        self._last_episode_starts = np.asarray(dones, dtype=bool)

    def load_replay_buffer(
        self,
        path: str | pathlib.Path | io.BufferedIOBase,
        truncate_last_traj: bool = True,
    ) -> None:
        """Load a replay buffer saved by ``save_replay_buffer`` (a sequence buffer).

        It samples with this model's ``sequence_length`` and ``burn_in``, whatever it was
        saved with: they only decide how stored transitions are read.

        :param path: the pickled buffer
        :param truncate_last_traj: SB3's meaning: the episodes the buffer was saved in ended
            there, so the next transitions start new episodes and no sequence joins a saved
            episode to whatever the environments run now. False: they continue those episodes
            (this model, its environments not reset since the buffer was saved)
        :raises ValueError: for another kind of buffer, leaving the current one in place
        """
        buffer = load_from_pkl(path, self.verbose)
        if not isinstance(buffer, (SequenceReplayBuffer, DictSequenceReplayBuffer)):
            raise ValueError(
                "RecurrentSAC trains on sequences: the replay buffer must be a "
                f"SequenceReplayBuffer or DictSequenceReplayBuffer, got {type(buffer).__name__}"
            )
        buffer.sequence_length, buffer.burn_in = int(self.sequence_length), int(self.burn_in)
        if truncate_last_traj:
            buffer.start_new_episodes()
        buffer.device = self.device
        self.replay_buffer = buffer

    # Training -------------------------------------------------------------------------------

    def _entropy_coefficient(self) -> Tensor:
        if self.ent_coef_optimizer is not None and self.log_ent_coef is not None:
            # Detached: only ent_coef_loss trains it (softlearning issue #60, as in SB3).
            return torch.exp(self.log_ent_coef.detach())
        return self.ent_coef_tensor

    def sequence_losses(
        self,
        batch: SequenceReplayBufferSamples,
        noise: tuple[Tensor, Tensor] | None = None,
    ) -> SequenceLosses:
        """The critic, actor and entropy-coefficient losses of a batch of sequences.

        One actor pass over the inputs gives the policy at the current observations
        (positions ``K .. K+L-1``: actor and entropy losses) and at the next ones
        (``K+1 .. K+L``: the targets); one pass of each target critic cell gives the next
        values, one pass of each critic cell the current values, whose cell outputs the
        actor's loss reuses detached (the actor's loss trains the actor only). Terminations
        do not bootstrap; truncations (timeouts) do, from the stored last observation.

        :param batch: sampled sequences (:meth:`SequenceReplayBuffer.sample`)
        :param noise: standard normal draws ``(B, L, action_dim)`` for the current and for the
            next actions (drawn when None; given, the losses are deterministic)
        """
        burn_in, steps = batch.burn_in, batch.actions.shape[1]
        mask = batch.mask
        # Zeros at padded transitions before any use: a NaN there would survive a mask applied
        # to the losses only (0 · NaN in the backward pass of the layer that read it).
        actions = torch.where(mask.unsqueeze(-1), batch.actions, batch.actions.new_zeros(()))
        rewards = torch.where(mask, batch.rewards, batch.rewards.new_zeros(()))
        dones = torch.where(mask, batch.dones, batch.dones.new_zeros(()))
        ent_coef = self._entropy_coefficient()
        noise_now, noise_next = (None, None) if noise is None else noise

        mean, log_std = self.actor.sequence_distribution(batch.observations, batch.valid, burn_in)
        actions_pi, log_prob = self.actor.sample_actions(
            mean[:, :steps], log_std[:, :steps], noise_now
        )
        ent_coef_loss = None
        if self.ent_coef_optimizer is not None and self.log_ent_coef is not None:
            assert isinstance(self.target_entropy, float)
            target = (log_prob + self.target_entropy).detach()
            ent_coef_loss = -masked_mean(self.log_ent_coef * target, mask)

        with torch.no_grad():
            next_actions, next_log_prob = self.actor.sample_actions(
                mean[:, 1:], log_std[:, 1:], noise_next
            )
            next_latents = self.critic_target.latents(batch.observations, batch.valid, burn_in)
            next_q = self.critic_target.q_values([z[:, 1:] for z in next_latents], next_actions)
            next_q = torch.stack(next_q).min(dim=0).values - ent_coef * next_log_prob
            target_q = rewards + (1 - dones) * self.gamma * next_q

        latents = self.critic.latents(batch.observations, batch.valid, burn_in, steps)
        current_q = self.critic.q_values(latents, actions)
        critic_loss = 0.5 * sum(masked_mean((q - target_q).square(), mask) for q in current_q)

        q_pi = self.critic.q_values([z.detach() for z in latents], actions_pi)
        min_q_pi = torch.stack(q_pi).min(dim=0).values
        actor_loss = masked_mean(ent_coef * log_prob - min_q_pi, mask)
        return SequenceLosses(critic_loss, actor_loss, ent_coef_loss, ent_coef)  # type: ignore[arg-type]

    def train(self, gradient_steps: int, batch_size: int = 32) -> None:
        """``gradient_steps`` updates, each on ``batch_size`` sequences (see
        :meth:`sequence_losses`), then SAC's polyak update of the target critics."""
        self.policy.set_training_mode(True)
        optimizers = [self.actor.optimizer, self.critic.optimizer]
        if self.ent_coef_optimizer is not None:
            optimizers.append(self.ent_coef_optimizer)
        self._update_learning_rate(optimizers)

        ent_coef_losses, ent_coefs, actor_losses, critic_losses = [], [], [], []
        for gradient_step in range(gradient_steps):
            batch = self.replay_buffer.sample(batch_size, env=self._vec_normalize_env)
            losses = self.sequence_losses(batch)
            ent_coefs.append(losses.ent_coef.item())
            if losses.ent_coef_loss is not None and self.ent_coef_optimizer is not None:
                ent_coef_losses.append(losses.ent_coef_loss.item())
                self.ent_coef_optimizer.zero_grad()
                losses.ent_coef_loss.backward()
                self.ent_coef_optimizer.step()
            # Both backward passes before either step: the actor's loss reads the critic heads'
            # weights, which the critic's step changes in place. The gradients the actor's loss
            # leaves on the critic heads are cleared before the critic's own.
            self.actor.optimizer.zero_grad()
            losses.actor_loss.backward()
            self.critic.optimizer.zero_grad()
            losses.critic_loss.backward()
            self.actor.optimizer.step()
            self.critic.optimizer.step()
            actor_losses.append(losses.actor_loss.item())
            critic_losses.append(losses.critic_loss.item())

            if gradient_step % self.target_update_interval == 0:
                polyak_update(self.critic.parameters(), self.critic_target.parameters(), self.tau)
                polyak_update(self.batch_norm_stats, self.batch_norm_stats_target, 1.0)

        self._n_updates += gradient_steps
        self.logger.record("train/n_updates", self._n_updates, exclude="tensorboard")
        self.logger.record("train/ent_coef", np.mean(ent_coefs))
        self.logger.record("train/actor_loss", np.mean(actor_losses))
        self.logger.record("train/critic_loss", np.mean(critic_losses))
        if ent_coef_losses:
            self.logger.record("train/ent_coef_loss", np.mean(ent_coef_losses))

    def learn(
        self: SelfRecurrentSAC,
        total_timesteps: int,
        callback: MaybeCallback = None,
        log_interval: int = 4,
        tb_log_name: str = "RecurrentSAC",
        reset_num_timesteps: bool = True,
        progress_bar: bool = False,
    ) -> SelfRecurrentSAC:
        return super().learn(
            total_timesteps=total_timesteps,
            callback=callback,
            log_interval=log_interval,
            tb_log_name=tb_log_name,
            reset_num_timesteps=reset_num_timesteps,
            progress_bar=progress_bar,
        )

    def predict(  # type: ignore[override]
        self,
        observation: np.ndarray | dict[str, np.ndarray],
        state: np.ndarray | None = None,
        episode_start: np.ndarray | None = None,
        deterministic: bool = False,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The actions and the actor's new state (see :meth:`RecurrentSACPolicy.predict`):
        pass the returned state back at the next call, and ``episode_start`` True where an
        episode starts (as with RecurrentPPO; ``evaluate_policy`` does both)."""
        return self.policy.predict(observation, state, episode_start, deterministic)
