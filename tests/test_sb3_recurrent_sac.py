"""RecurrentSAC: sequence losses against a step-by-step reference, padding and episode
boundaries, burn-in, the sequence replay buffer, predict/evaluate/save/load, Δt, learning."""

from __future__ import annotations

import itertools
import math

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium import spaces
from small_cells import small_cell_kwargs
from stable_baselines3 import SAC
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.evaluation import evaluate_policy
from stable_baselines3.common.vec_env import VecNormalize

import cfc_rl.envs  # noqa: F401  (registers the task ids)
from cfc_rl.envs import IrregularTime
from cfc_rl.nn import CELLS
from cfc_rl.sb3 import (
    DictSequenceReplayBuffer,
    ElapsedTimeExtractor,
    RecurrentSAC,
    RecurrentSACPolicy,
    SequenceReplayBuffer,
)
from cfc_rl.sb3.recurrent_sac import SequenceReplayBufferSamples

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL_CELL_KWARGS = small_cell_kwargs(backbone_units=16, ode_unfolds=2)


class Counter(gym.Env):
    """Observations ``[0.01 · episode uid, 0.1 · step, noise]``: every episode has a uid unique
    in the process, so a batch shows which episode and step each position comes from.
    Episodes terminate with probability ``terminate`` per step or are truncated (time limit)
    after ``max_steps``; rewards are noise."""

    observation_space = spaces.Box(-np.inf, np.inf, (3,), np.float32)
    action_space = spaces.Box(-1.0, 1.0, (1,), np.float32)
    dt = 0.1  # seconds per step, for IrregularTime
    _uids = itertools.count(1)

    def __init__(self, max_steps: int = 7, terminate: float = 0.15) -> None:
        self.max_steps, self.terminate = max_steps, terminate

    def _obs(self) -> np.ndarray:
        noise = self.np_random.normal()
        return np.array([0.01 * self.uid, 0.1 * self.t, noise], dtype=np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.uid, self.t = next(Counter._uids), 0
        return self._obs(), {}

    def step(self, action):
        self.t += 1
        terminated = bool(self.np_random.random() < self.terminate)
        truncated = self.t >= self.max_steps and not terminated
        return self._obs(), float(self.np_random.normal()), terminated, truncated, {}


class CueRecall(gym.Env):
    """A sign ±1 shows at the first step only (then 0); every step pays -(action - sign)².
    Episodes last ``length`` steps. Without memory the best is to act 0 after the first step
    (return -(length - 1)); with memory, 0."""

    observation_space = spaces.Box(-1.0, 1.0, (1,), np.float32)
    action_space = spaces.Box(-1.0, 1.0, (1,), np.float32)

    def __init__(self, length: int = 5) -> None:
        self.length = length

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.sign = 1.0 if self.np_random.random() < 0.5 else -1.0
        self.t = 0
        return np.array([self.sign], dtype=np.float32), {}

    def step(self, action):
        reward = -((float(action[0]) - self.sign) ** 2)
        self.t += 1
        return np.zeros(1, dtype=np.float32), reward, self.t >= self.length, False, {}


def counter_env(n_envs: int = 2, *, seed: int = 0, irregular: bool = False, **kwargs):
    if irregular:
        return make_vec_env(
            lambda: IrregularTime(Counter(**kwargs), 1, 3), n_envs=n_envs, seed=seed
        )
    return make_vec_env(Counter, n_envs=n_envs, seed=seed, env_kwargs=kwargs)


def small_model(env, cell: str = "cfc", **kwargs) -> RecurrentSAC:
    policy_kwargs = {"cell": cell, "hidden_size": 8, "net_arch": [16]}
    policy_kwargs.update(SMALL_CELL_KWARGS.get(cell, {}))
    policy_kwargs.update(kwargs.pop("policy_kwargs", {}))
    settings = {
        "buffer_size": 1000,
        "learning_starts": 20,
        "batch_size": 4,
        "sequence_length": 4,
        "burn_in": 2,
        "seed": 0,
        **kwargs,
    }
    policy = "MultiInputPolicy" if isinstance(env.observation_space, spaces.Dict) else "MlpPolicy"
    return RecurrentSAC(policy, env, policy_kwargs=policy_kwargs, **settings)


def filled_model(env, *, steps: int, **kwargs) -> RecurrentSAC:
    """A model whose buffer holds ``steps`` steps of every environment, untrained."""
    model = small_model(env, learning_starts=10**9, **kwargs)
    model.learn(steps * env.num_envs)
    return model


def stored_rows(buffer) -> np.ndarray:
    return np.arange(buffer.buffer_size if buffer.full else buffer.pos)


def all_anchors(buffer) -> tuple[np.ndarray, np.ndarray]:
    """Every stored transition of every environment, as (rows, env_indices)."""
    rows, envs = np.meshgrid(stored_rows(buffer), np.arange(buffer.n_envs), indexing="ij")
    return rows.ravel(), envs.ravel()


def as_double(batch: SequenceReplayBufferSamples) -> SequenceReplayBufferSamples:
    def double(value):
        if isinstance(value, dict):
            return {key: double(part) for key, part in value.items()}
        return value.double()

    return batch._replace(
        observations=double(batch.observations),
        actions=batch.actions.double(),
        rewards=batch.rewards.double(),
        dones=batch.dones.double(),
    )


def double_model(model: RecurrentSAC, ent_coef: float = 0.3) -> RecurrentSAC:
    model.policy.double()
    model.log_ent_coef = torch.tensor([math.log(ent_coef)], dtype=torch.float64).requires_grad_()
    return model


def loss_parameters(model: RecurrentSAC) -> list[torch.Tensor]:
    return [*model.actor.parameters(), *model.critic.parameters(), model.log_ent_coef]


def gradients(loss: torch.Tensor, parameters: list[torch.Tensor]) -> list[torch.Tensor]:
    grads = torch.autograd.grad(loss, parameters, retain_graph=True, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, parameters, strict=True)]


def losses_and_gradients(model: RecurrentSAC, batch, noise) -> dict[str, tuple]:
    losses = model.sequence_losses(batch, noise=noise)
    parameters = loss_parameters(model)
    return {
        name: (loss.detach(), gradients(loss, parameters))
        for name, loss in (
            ("critic", losses.critic_loss),
            ("actor", losses.actor_loss),
            ("ent_coef", losses.ent_coef_loss),
        )
    }


def assert_same_losses(got: dict[str, tuple], expected: dict[str, tuple]) -> None:
    for name in ("critic", "actor", "ent_coef"):
        (loss, grads), (loss_ref, grads_ref) = got[name], expected[name]
        assert torch.isfinite(loss), name
        torch.testing.assert_close(loss, loss_ref, msg=f"{name} loss")
        for i, (grad, grad_ref) in enumerate(zip(grads, grads_ref, strict=True)):
            assert torch.isfinite(grad).all(), f"{name} gradient {i}"
            torch.testing.assert_close(grad, grad_ref, msg=f"{name} gradient {i}")


# The step-by-step reference -----------------------------------------------------------------


def reference_losses(model: RecurrentSAC, rows, envs, noise) -> dict[str, tuple]:
    """The three losses from a loop over sequences and steps: each cell is called on one time
    step at a time, the state starts from zeros at the first step of the episode (or of the
    burn-in), the burn-in runs without gradient, a sequence stops at its episode's end (read
    from the raw storage: episode ids, add order), terminations do not bootstrap and
    truncations do."""
    buffer, policy = model.replay_buffer, model.policy
    size, burn_in, length = buffer.buffer_size, buffer.burn_in, buffer.sequence_length
    alpha = torch.exp(model.log_ent_coef.detach())

    def stored(row: int, env: int, offset: int) -> bool:
        other = (row + offset) % size
        return bool(
            buffer.episode_ids[other, env] == buffer.episode_ids[row, env]
            and buffer.add_numbers[other] == buffer.add_numbers[row] + offset
        )

    def read(storage, row: int, env: int):
        if isinstance(storage, dict):
            return {
                key: torch.as_tensor(part[row % size, env][None]) for key, part in storage.items()
            }
        return torch.as_tensor(storage[row % size, env][None])

    def cell_step(module, cell, obs, state):
        features = module.extract_features(obs, module.features_extractor).double()
        dt = None
        if isinstance(module.features_extractor, ElapsedTimeExtractor):
            features, dt = features[:, :-1], features[:, -1:]
            if not cell.uses_timespans:  # LSTM, GRU: Δt is one more input
                features, dt = torch.cat([features, dt], dim=1), None
        y, state = cell(features[:, None], state, timespans=dt)
        return y[:, 0], state

    def run(module, cell, inputs, burn):
        state = torch.zeros(1, cell.state_size, dtype=torch.float64)  # the episode's start
        with torch.no_grad():
            for obs in inputs[:burn]:
                _, state = cell_step(module, cell, obs, state)
        outputs = []
        for obs in inputs[burn:]:
            y, state = cell_step(module, cell, obs, state)
            outputs.append(y)
        return outputs

    def policy_sample(latent, eps):
        actor = policy.actor
        hidden = actor.latent_pi(latent)
        mean, log_std = actor.mu(hidden), torch.clamp(actor.log_std(hidden), -20, 2)
        gaussian = mean + log_std.exp() * eps
        action = torch.tanh(gaussian)
        normal = (
            -0.5 * ((gaussian - mean) / log_std.exp()) ** 2 - log_std - 0.5 * math.log(2 * math.pi)
        )
        log_prob = normal.sum() - torch.log(1 - action**2 + 1e-6).sum()
        return action, log_prob

    def q(critic, index, latent, action):
        return critic.q_networks[index](torch.cat([latent, action.double()], dim=-1))[0, 0]

    n_critics = len(policy.critic.cells)
    critic_terms: list[list[torch.Tensor]] = [[] for _ in range(n_critics)]
    actor_terms, ent_terms = [], []
    for b, (row, env) in enumerate(zip(rows, envs, strict=True)):
        burn = 0
        while burn < burn_in and stored(row, env, -(burn + 1)):
            burn += 1
        steps = 1
        while steps < length and stored(row, env, steps):
            steps += 1
        inputs = [read(buffer.observations, row - j, env) for j in range(burn, -1, -1)]
        inputs += [read(buffer.next_observations, row + i, env) for i in range(steps)]
        actor_out = run(policy.actor, policy.actor.cell, inputs, burn)
        critic_out = [run(policy.critic, cell, inputs, burn) for cell in policy.critic.cells]
        with torch.no_grad():
            target_out = [
                run(policy.critic_target, cell, inputs, burn) for cell in policy.critic_target.cells
            ]
        for i in range(steps):
            at = (row + i) % size
            action = torch.as_tensor(buffer.actions[at, env][None])
            reward = float(buffer.rewards[at, env])
            terminated = bool(buffer.dones[at, env]) and not bool(buffer.timeouts[at, env])
            action_pi, log_prob = policy_sample(actor_out[i], noise[0][b, i])
            with torch.no_grad():
                next_action, next_log_prob = policy_sample(actor_out[i + 1], noise[1][b, i])
                next_q = min(
                    q(policy.critic_target, k, target_out[k][i + 1], next_action)
                    for k in range(n_critics)
                )
                target = reward
                if not terminated:
                    target = reward + model.gamma * (next_q - alpha[0] * next_log_prob)
            for k in range(n_critics):
                critic_terms[k].append(
                    (q(policy.critic, k, critic_out[k][i], action) - target) ** 2
                )
            min_q_pi = torch.stack(
                [
                    q(policy.critic, k, critic_out[k][i].detach(), action_pi)
                    for k in range(n_critics)
                ]
            ).min()
            actor_terms.append(alpha[0] * log_prob - min_q_pi)
            entropy_gap = (log_prob + model.target_entropy).detach()
            ent_terms.append(-(model.log_ent_coef[0] * entropy_gap))
    losses = {
        "critic": 0.5 * sum(torch.stack(terms).mean() for terms in critic_terms),
        "actor": torch.stack(actor_terms).mean(),
        "ent_coef": torch.stack(ent_terms).mean(),
    }
    parameters = loss_parameters(model)
    return {name: (loss.detach(), gradients(loss, parameters)) for name, loss in losses.items()}


@pytest.mark.parametrize(("cell", "irregular"), [("cfc", False), ("cfc", True), ("lstm", True)])
def test_sequence_losses_equal_a_step_by_step_reference(cell: str, irregular: bool) -> None:
    # 2 environments, 30 rows: the ring has wrapped, episodes end by termination and by
    # truncation, sequences are cut at both ends.
    env = counter_env(irregular=irregular)
    model = filled_model(env, steps=45, cell=cell, buffer_size=60, sequence_length=5, burn_in=3)
    buffer = model.replay_buffer
    assert buffer.full and buffer.dones.any() and buffer.timeouts.any()
    double_model(model)
    rows, envs = all_anchors(buffer)
    batch = as_double(buffer.get_sequences(rows, envs))
    mask = batch.mask
    assert (~mask).any() and mask[:, -1].any() and (~batch.valid[:, : buffer.burn_in]).any()
    generator = torch.Generator().manual_seed(0)
    noise = tuple(
        torch.randn((*mask.shape, 1), generator=generator, dtype=torch.float64) for _ in range(2)
    )
    got = losses_and_gradients(model, batch, noise)
    expected = reference_losses(model, rows, envs, noise)
    assert_same_losses(got, expected)
    # The critic's loss trains every parameter of the critics (cells and heads), the actor's
    # every parameter of the actor, the entropy coefficient's α: nothing is cut off.
    # The actor's loss does not reach the critic cells (it reads their outputs detached).
    names = [f"actor.{n}" for n, _ in model.actor.named_parameters()]
    names += [f"critic.{n}" for n, _ in model.critic.named_parameters()] + ["log_ent_coef"]
    trained = {
        loss: {name for name, g in zip(names, got[loss][1], strict=True) if g.abs().sum() > 0}
        for loss in got
    }
    assert trained["critic"] == {name for name in names if name.startswith("critic.")}
    critic_cells = {name for name in names if name.startswith("critic.cells.")}
    actor = {name for name in names if name.startswith("actor.")}
    # (min over the critics: the heads of the smaller Q get the actor's gradient)
    assert actor <= trained["actor"] <= actor | {n for n in names if n.startswith("critic.qf")}
    assert critic_cells and not trained["actor"] & critic_cells
    assert trained["ent_coef"] == {"log_ent_coef"}


# Padding and episode boundaries -----------------------------------------------------------


def _positions(buffer, rows, envs, *, valid_only: bool) -> np.ndarray:
    """(buffer_size, n_envs) bool: the storage positions of the batch's windows (transitions
    t-K .. t+L-1 around each anchor t), or only those some sequence reads as its own data."""
    used = np.zeros((buffer.buffer_size, buffer.n_envs), dtype=bool)
    validity = buffer.sequence_validity(rows, envs)
    offsets = np.arange(-buffer.burn_in, buffer.sequence_length)
    for row, env, valid in zip(rows, envs, validity, strict=True):
        used[(row + offsets[valid if valid_only else slice(None)]) % buffer.buffer_size, env] = True
    return used


def _overwrite(buffer, where: np.ndarray, fill: str, rng: np.random.Generator) -> None:
    def values(shape):
        return np.full(shape, np.nan) if fill == "nan" else rng.normal(size=shape) * 100

    for name in ("observations", "next_observations", "actions", "rewards", "dones", "timeouts"):
        storage = getattr(buffer, name)
        for part in storage.values() if isinstance(storage, dict) else [storage]:
            part[where] = values(part[where].shape).astype(part.dtype)


@pytest.mark.parametrize("fill", ["nan", "random"])
@pytest.mark.parametrize("wrapped", [False, True])
def test_padding_and_other_episodes_never_reach_the_losses(fill: str, wrapped: bool) -> None:
    """Overwriting every storage position that no sequence of the batch reads as its own data
    (other episodes inside the windows, the ring's head, rows not yet written) with NaN or
    with large random numbers changes neither the losses nor their gradients."""
    env = counter_env()
    # Not wrapped: 40 of 100 rows written; wrapped: 60 rows written into 25, so that the
    # ring's head cuts episodes.
    model = filled_model(
        env, steps=60 if wrapped else 40, buffer_size=50 if wrapped else 200, burn_in=3
    )
    buffer = model.replay_buffer
    assert buffer.full == wrapped
    double_model(model)
    rng = np.random.default_rng(1)
    rows = rng.choice(stored_rows(buffer), size=8, replace=False)
    envs = rng.integers(0, 2, size=8)
    # Also anchors at the newest row and at row 0 (whose burn-in reaches the end of the ring).
    rows, envs = np.concatenate([rows, [buffer.pos - 1, 0]]), np.concatenate([envs, [0, 1]])
    noise = tuple(
        torch.randn(len(rows), buffer.sequence_length, 1, dtype=torch.float64) for _ in range(2)
    )
    expected = losses_and_gradients(model, as_double(buffer.get_sequences(rows, envs)), noise)

    unused = ~_positions(buffer, rows, envs, valid_only=True)
    padding = unused & _positions(buffer, rows, envs, valid_only=False)
    assert padding.sum() >= 8, "the windows should reach other episodes and unwritten rows"
    _overwrite(buffer, unused, fill, rng)
    batch = as_double(buffer.get_sequences(rows, envs))
    assert_same_losses(losses_and_gradients(model, batch, noise), expected)


def test_nan_at_padded_positions_of_a_batch_is_masked() -> None:
    """The policy masks padding itself (torch.where before every module and loss), whatever
    the batch holds there, not only what the buffer zeroed."""
    model = double_model(filled_model(counter_env(irregular=True), steps=30, burn_in=3))
    buffer = model.replay_buffer
    rows, envs = all_anchors(buffer)
    batch = as_double(buffer.get_sequences(rows, envs))
    assert (~batch.valid).any()
    noise = tuple(torch.randn((*batch.mask.shape, 1), dtype=torch.float64) for _ in range(2))
    expected = losses_and_gradients(model, batch, noise)

    def poison(value, valid):
        keep = valid.reshape(valid.shape + (1,) * (value.dim() - valid.dim()))
        return torch.where(keep, value, torch.full_like(value, math.nan))

    poisoned = batch._replace(
        observations={k: poison(v, batch.valid) for k, v in batch.observations.items()},
        actions=poison(batch.actions, batch.mask),
        rewards=poison(batch.rewards, batch.mask),
        dones=poison(batch.dones, batch.mask),
    )
    assert_same_losses(losses_and_gradients(model, poisoned, noise), expected)


def test_burn_in_warms_the_state_without_gradient() -> None:
    model = double_model(filled_model(counter_env(), steps=40, burn_in=3, sequence_length=4))
    buffer, burn_in = model.replay_buffer, model.burn_in
    rows, envs = all_anchors(buffer)
    batch = as_double(buffer.get_sequences(rows, envs))
    assert batch.valid[:, :burn_in].any()
    observations = batch.observations.clone().requires_grad_()
    losses = model.sequence_losses(batch._replace(observations=observations))
    for loss in (losses.critic_loss, losses.actor_loss):
        (grad,) = torch.autograd.grad(loss, observations, retain_graph=True)
        assert (grad[:, :burn_in] == 0).all()
        assert grad[:, burn_in:][batch.valid[:, burn_in:]].abs().sum() > 0

    # ... but its inputs change the state the sequence starts from, so the losses.
    noise = tuple(torch.randn((*batch.mask.shape, 1), dtype=torch.float64) for _ in range(2))
    before = model.sequence_losses(batch, noise=noise)
    changed = batch.observations.clone()
    changed[:, :burn_in] += 1.0
    after = model.sequence_losses(batch._replace(observations=changed), noise=noise)
    assert not torch.allclose(before.critic_loss, after.critic_loss)
    assert not torch.allclose(before.actor_loss, after.actor_loss)


# The sequence replay buffer ---------------------------------------------------------------


def test_buffer_memory_is_bounded_and_sequences_stay_in_one_stored_episode() -> None:
    env = counter_env(max_steps=9, terminate=0.1)
    model = filled_model(env, steps=80, buffer_size=40, sequence_length=6, burn_in=4)
    buffer = model.replay_buffer
    assert isinstance(buffer, SequenceReplayBuffer) and buffer.full
    assert buffer.observations.shape == (20, 2, 3) and buffer.next_observations.shape == (20, 2, 3)
    assert buffer.actions.shape == (20, 2, 1) and buffer.episode_ids.shape == (20, 2)

    def stored_steps(env_index: int) -> set[tuple[int, int]]:
        obs = buffer.observations[:, env_index]
        return {(round(u * 100), round(t * 10)) for u, t in obs[:, :2]}

    # Every anchor of both environments: the ring wraps at row 19 -> 0 and has its head at pos.
    rows, envs = all_anchors(buffer)
    batch = buffer.get_sequences(rows, envs)
    obs, valid = batch.observations.numpy(), batch.valid.numpy()
    uid, step = np.rint(obs[..., 0] * 100).astype(int), np.rint(obs[..., 1] * 10).astype(int)
    crossed_wrap = False
    for b in range(len(rows)):
        positions = np.flatnonzero(valid[b])
        assert (np.diff(positions) == 1).all()  # one run of valid positions
        assert len(set(uid[b, positions])) == 1  # one episode
        assert (np.diff(step[b, positions]) == 1).all()  # consecutive steps of it
        assert (obs[b, ~valid[b]] == 0).all()  # padding is zeros
        first, last = positions[0], positions[-1]
        episode, start = uid[b, first], step[b, first]
        if first > 0 and start > 0:  # the burn-in stops early only where the data is gone
            assert (episode, start - 1) not in stored_steps(envs[b])
        last_transition = (rows[b] + last - buffer.burn_in - 1) % buffer.buffer_size
        if last < valid.shape[1] - 1:  # the sequence stops early at the episode's end...
            ended = buffer.dones[last_transition, envs[b]] > 0
            newest = last_transition == (buffer.pos - 1) % buffer.buffer_size
            assert ended or newest  # ... or at the newest stored step
        span = rows[b] + np.array([first, last]) - buffer.burn_in
        crossed_wrap |= span[0] < buffer.buffer_size <= span[1] or span[0] < 0 <= span[1]
    assert crossed_wrap, "some sequence should run across the ring's wrap inside an episode"

    batch = buffer.sample(64)
    assert batch.observations.shape == (64, 4 + 1 + 6, 3) and batch.mask.shape == (64, 6)
    assert batch.valid[:, 4].all()


def test_a_loaded_replay_buffer_samples_with_the_model_settings_and_its_episodes_end(
    tmp_path,
) -> None:
    saved = filled_model(counter_env(max_steps=50, terminate=0.0), steps=20, sequence_length=5)
    saved.save_replay_buffer(tmp_path / "buffer.pkl")
    last_row = saved.replay_buffer.pos - 1  # both environments are inside their episodes

    def sequence_lengths(model) -> np.ndarray:
        """The transitions of the sequences anchored at the saved buffer's newest row."""
        batch = model.replay_buffer.get_sequences(np.full(2, last_row), np.arange(2))
        return batch.mask.sum(1).numpy()

    # Another model, already stepping its own environments, continues without a reset.
    model = filled_model(counter_env(seed=1), steps=5, sequence_length=7, burn_in=1)
    model.load_replay_buffer(tmp_path / "buffer.pkl")
    buffer = model.replay_buffer
    assert (buffer.sequence_length, buffer.burn_in) == (7, 1)
    assert buffer.sample(3).observations.shape == (3, 1 + 1 + 7, 3)
    model.learn(10, reset_num_timesteps=False)
    # The saved episodes ended at the save: no sequence runs on into the new environments.
    np.testing.assert_array_equal(sequence_lengths(model), [1, 1])

    # The same model and environments, not reset since the save, may continue the episodes.
    saved.load_replay_buffer(tmp_path / "buffer.pkl", truncate_last_traj=False)
    saved.learn(10, reset_num_timesteps=False)
    np.testing.assert_array_equal(sequence_lengths(saved), [5, 5])

    # A buffer of plain transitions is refused, and the model keeps its own.
    sac = SAC("MlpPolicy", counter_env(), buffer_size=100)
    sac.save_replay_buffer(tmp_path / "plain.pkl")
    with pytest.raises(ValueError, match=r"must be a SequenceReplayBuffer .*, got ReplayBuffer"):
        model.load_replay_buffer(tmp_path / "plain.pkl")
    assert model.replay_buffer is buffer


def test_rollouts_carry_the_actor_state_and_reset_it_at_episode_starts() -> None:
    """During the random warm-up too: the state at the end equals the state of a fresh run
    over the stored observations of each environment's current episode."""
    env = counter_env(max_steps=12, terminate=0.05)
    model = filled_model(env, steps=21, burn_in=2)
    buffer, policy = model.replay_buffer, model.policy
    assert model.num_timesteps < model.learning_starts and buffer.dones.any()
    checked = 0
    for env_index in range(2):
        if model._last_episode_starts[env_index]:
            continue  # the episode just ended: the next step resets
        episode = buffer._episode_of_env[env_index]
        episode_rows = np.flatnonzero(buffer.episode_ids[: buffer.pos, env_index] == episode)
        state, start = None, np.ones(1, dtype=bool)
        for row in episode_rows:
            _, state = policy.predict(buffer.observations[row, env_index][None], state, start)
            start = np.zeros(1, dtype=bool)
        np.testing.assert_allclose(model._last_actor_state[env_index], state[0], atol=1e-6)
        checked += 1
    assert checked


def test_the_buffer_of_dict_observations_keeps_elapsed_time_raw(tmp_path) -> None:
    env = make_vec_env("cfc_rl/Pendulum-P-v1", n_envs=2, seed=0, env_kwargs={"irregular": (1, 4)})
    everything = VecNormalize(env)  # normalises "dt" too: refused for training
    model = small_model(everything, tensorboard_log=str(tmp_path))
    with pytest.raises(ValueError, match=r"VecNormalize normalises 'dt'.*norm_obs_keys=\['obs'\]"):
        model.learn(10)
    # Refused before anything happens: no environment reset, no log folder.
    assert model._last_obs is None and not any(tmp_path.iterdir())

    venv = VecNormalize(env, norm_obs_keys=["obs"])
    model = small_model(venv, learning_starts=30)
    assert isinstance(model.replay_buffer, DictSequenceReplayBuffer)
    model.learn(80)
    batch = model.replay_buffer.sample(32, env=venv)
    # Even a VecNormalize that normalises every key leaves Δt as stored, in seconds.
    batch_all = model.replay_buffer.sample(32, env=everything)
    for sample in (batch, batch_all):
        dt = sample.observations["dt"][sample.valid].numpy().ravel()
        np.testing.assert_allclose(sorted(set(np.round(dt, 6))), [0.05, 0.1, 0.15, 0.2], rtol=1e-5)
        assert (sample.observations["dt"][~sample.valid] == 0).all()
    # The other entries are normalised (Pendulum's cos θ, sin θ are not centred and scaled).
    stored = model.replay_buffer.observations["obs"][: model.replay_buffer.pos].reshape(-1, 2)
    assert not np.allclose(stored.mean(0), venv.normalize_obs({"obs": stored})["obs"].mean(0))


# The policy: predict, evaluate, save/load, Δt ------------------------------------------------


def rollout_actions(model, observations: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Deterministic actions along a fixed sequence of observations ``(T, n_envs, ...)``,
    carrying the state and resetting it where ``starts (T, n_envs)``, as a control loop does."""
    state, actions = None, []
    for obs, start in zip(observations, starts, strict=True):
        action, state = model.predict(obs, state=state, episode_start=start, deterministic=True)
        actions.append(action)
    return np.array(actions)


@pytest.mark.parametrize("cell", sorted(CELLS))
def test_every_cell_trains_predicts_with_state_and_reloads(cell: str, tmp_path) -> None:
    env = counter_env(max_steps=6)
    model = small_model(env, cell=cell)
    assert isinstance(model.policy, RecurrentSACPolicy)
    before = [p.detach().clone() for p in model.actor.cell.parameters()]
    model.learn(60)
    assert model._n_updates > 0
    after = list(model.actor.cell.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))
    for cell_module in (*model.critic.cells, *model.critic_target.cells):
        assert type(cell_module) is type(model.actor.cell)

    obs = env.reset()
    state_size = model.policy.state_size
    _, state = model.predict(obs, deterministic=True)
    assert state.shape == (2, state_size) and state_size == model.actor.cell.state_size
    _, again = model.predict(obs, state=state, deterministic=True)
    assert not np.allclose(again, state)
    _, restarted = model.predict(obs, state=state, episode_start=np.ones(2), deterministic=True)
    np.testing.assert_allclose(restarted, state, atol=1e-6)

    model.save(tmp_path / "model.zip")
    loaded = RecurrentSAC.load(tmp_path / "model.zip", env=env)
    assert type(loaded.actor.cell) is type(model.actor.cell)
    rng = np.random.default_rng(0)
    observations = rng.normal(size=(12, 2, 3)).astype(np.float32)
    starts = np.zeros((12, 2), dtype=bool)
    starts[[0, 5], 0] = starts[[0, 8], 1] = True
    actions = rollout_actions(model, observations, starts)
    np.testing.assert_array_equal(rollout_actions(loaded, observations, starts), actions)
    assert len(np.unique(actions.round(6))) > 12  # the state and the observations matter


@pytest.mark.parametrize(
    "policy_kwargs",
    [
        {"share_features_extractor": True},
        {"net_arch": {"pi": [8], "qf": [16, 16]}, "n_critics": 3},
    ],
)
def test_policy_options(policy_kwargs, tmp_path) -> None:
    env = counter_env(max_steps=6)
    model = small_model(env, policy_kwargs=policy_kwargs)
    model.learn(40)
    critic = model.critic
    assert len(critic.cells) == len(critic.q_networks) == policy_kwargs.get("n_critics", 2)
    shared = policy_kwargs.get("share_features_extractor", False)
    assert (critic.features_extractor is model.actor.features_extractor) == shared
    if "net_arch" in policy_kwargs:
        assert [m.out_features for m in model.actor.latent_pi if hasattr(m, "out_features")] == [8]
        assert [m.out_features for m in critic.q_networks[0] if hasattr(m, "out_features")] == [
            16,
            16,
            1,
        ]
    model.save(tmp_path / "model.zip")
    loaded = RecurrentSAC.load(tmp_path / "model.zip", env=env)
    assert loaded.policy.share_features_extractor == shared
    assert len(loaded.critic.cells) == len(critic.cells)
    observations = np.random.default_rng(0).normal(size=(6, 2, 3)).astype(np.float32)
    starts = np.zeros((6, 2), dtype=bool)
    starts[0] = True
    np.testing.assert_array_equal(
        rollout_actions(loaded, observations, starts), rollout_actions(model, observations, starts)
    )


def test_vecnormalize_box_observations_and_rewards_are_normalised_at_sample_time() -> None:
    venv = VecNormalize(counter_env())
    model = small_model(venv, learning_starts=10**9)
    model.learn(60)
    buffer = model.replay_buffer
    rows, envs = all_anchors(buffer)
    raw = buffer.get_sequences(rows, envs)
    normalised = buffer.get_sequences(rows, envs, env=venv)
    valid, mask = raw.valid.numpy(), raw.mask.numpy()
    np.testing.assert_allclose(
        normalised.observations.numpy()[valid],
        venv.normalize_obs(raw.observations.numpy()[valid]),
        rtol=1e-5,
        atol=1e-6,
    )
    np.testing.assert_allclose(
        normalised.rewards.numpy()[mask],
        venv.normalize_reward(raw.rewards.numpy()[mask]),
        rtol=1e-5,
    )
    assert (normalised.observations.numpy()[~valid] == 0).all()


def test_predict_state_memory_and_evaluate_policy() -> None:
    env = make_vec_env(CueRecall, n_envs=2, seed=0)
    model = small_model(env)
    model.learn(50)
    obs = np.zeros((2, 1), dtype=np.float32)
    # The state is the memory: the same observation acts differently after different cues.
    _, plus = model.predict(
        np.ones((2, 1), np.float32), episode_start=np.ones(2), deterministic=True
    )
    _, minus = model.predict(
        -np.ones((2, 1), np.float32), episode_start=np.ones(2), deterministic=True
    )
    after_plus, _ = model.predict(obs, state=plus, deterministic=True)
    after_minus, _ = model.predict(obs, state=minus, deterministic=True)
    assert not np.allclose(after_plus, after_minus)
    # An episode start forgets it; None is the zero state.
    reset_plus, _ = model.predict(obs, state=plus, episode_start=np.ones(2), deterministic=True)
    fresh, _ = model.predict(obs, deterministic=True)
    np.testing.assert_allclose(reset_plus, fresh, atol=1e-6)
    # One environment's reset leaves the other's state alone.
    mixed, _ = model.predict(obs, state=plus, episode_start=np.array([1, 0]), deterministic=True)
    np.testing.assert_allclose(mixed[0], fresh[0], atol=1e-6)
    np.testing.assert_allclose(mixed[1], after_plus[1], atol=1e-6)
    # An unbatched observation.
    single, single_state = model.predict(np.ones(1, np.float32), deterministic=True)
    assert single.shape == (1,) and single_state.shape == (1, model.policy.state_size)

    mean, _ = evaluate_policy(model, env, n_eval_episodes=4, deterministic=True)
    assert np.isfinite(mean) and -20 <= mean <= 0


def test_elapsed_time_reaches_every_cell_unnormalised() -> None:
    env = make_vec_env("cfc_rl/Pendulum-P-v1", n_envs=2, seed=0, env_kwargs={"irregular": (1, 4)})
    env = VecNormalize(env, norm_obs_keys=["obs"])
    model = small_model(env, learning_starts=30)
    assert isinstance(model.actor.features_extractor, ElapsedTimeExtractor)
    assert model.policy.time_key == "dt" and model.actor.time_in_features
    seen: dict[str, list[torch.Tensor]] = {"actor": [], "critic": [], "target": []}

    def recorder(name):
        def record(module, args, kwargs):
            if kwargs["timespans"] is not None:
                seen[name].append(kwargs["timespans"].detach().flatten())

        return record

    model.actor.cell.register_forward_pre_hook(recorder("actor"), with_kwargs=True)
    for cell in model.critic.cells:
        cell.register_forward_pre_hook(recorder("critic"), with_kwargs=True)
    for cell in model.critic_target.cells:
        cell.register_forward_pre_hook(recorder("target"), with_kwargs=True)
    model.learn(80)
    for name, values in seen.items():
        timespans = torch.cat(values)
        timespans = timespans[timespans > 0]  # padding has zero Δt
        # Pendulum's base step is 0.05 s; an action lasts 1 to 4 of them.
        np.testing.assert_allclose(
            sorted(set(np.round(timespans.numpy(), 6))),
            [0.05, 0.1, 0.15, 0.2],
            rtol=1e-5,
            err_msg=name,
        )

    # Δt changes what a CfC does with the same observation.
    obs = env.reset()
    short = {"obs": obs["obs"], "dt": np.full((2, 1), 0.05, np.float32)}
    long = {"obs": obs["obs"], "dt": np.full((2, 1), 0.2, np.float32)}
    action_short, _ = model.predict(short, episode_start=np.ones(2), deterministic=True)
    action_long, _ = model.predict(long, episode_start=np.ones(2), deterministic=True)
    assert not np.allclose(action_short, action_long)


def test_lstm_gets_elapsed_time_as_an_input_feature() -> None:
    env = make_vec_env("cfc_rl/Pendulum-P-v1", n_envs=1, seed=0, env_kwargs={"irregular": (1, 4)})
    for name in ("lstm", "gru", "cfc", "ltc"):
        model = small_model(env, cell=name)
        for cell in (model.actor.cell, *model.critic.cells):
            # cos θ, sin θ, and for discrete cells Δt
            assert cell.input_size == (2 if cell.uses_timespans else 3)


def test_bad_arguments_are_clear_errors() -> None:
    env = counter_env(n_envs=1)
    with pytest.raises(ValueError, match="unknown cell 'cfcc'; known cells"):
        small_model(env, cell="cfcc")
    with pytest.raises(ValueError, match="gSDE"):
        RecurrentSACPolicy(env.observation_space, env.action_space, lambda _: 1e-3, use_sde=True)
    with pytest.raises(ValueError, match="sequence_length must be >= 1"):
        small_model(env, sequence_length=0)
    with pytest.raises(ValueError, match="replay_buffer_class must be a SequenceReplayBuffer"):
        from stable_baselines3.common.buffers import ReplayBuffer

        small_model(env, replay_buffer_class=ReplayBuffer)
    with pytest.raises(ValueError, match="replay_buffer_kwargs\\['burn_in'\\]=5 differs"):
        small_model(env, replay_buffer_kwargs={"burn_in": 5})
    with pytest.raises(ValueError, match="optimize_memory_usage"):
        SequenceReplayBuffer(
            10, env.observation_space, env.action_space, optimize_memory_usage=True
        )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("cell", ["cfc", "lstm"])
def test_training_runs_on_cuda_end_to_end(cell: str) -> None:
    env = make_vec_env("cfc_rl/Pendulum-P-v1", n_envs=2, seed=0, env_kwargs={"irregular": (1, 4)})
    model = small_model(VecNormalize(env, norm_obs_keys=["obs"]), cell=cell, device="cuda")
    model.learn(60)
    assert model._n_updates > 0 and model.actor.cell.state_size > 0
    assert next(model.policy.parameters()).is_cuda
    batch = model.replay_buffer.sample(4)
    assert batch.valid.is_cuda and torch.isfinite(model.sequence_losses(batch).critic_loss)
    mean, _ = evaluate_policy(model, model.get_env(), n_eval_episodes=2, deterministic=True)
    assert np.isfinite(mean)


# Learning --------------------------------------------------------------------------------------

CUE_STEPS = 1200
CUE_THRESHOLD = -1.5
"""Mean return over 50 evaluation episodes of CueRecall (5 steps). A memoryless policy acts
the same on the 4 steps that show 0, whatever the cue: at best -1 per step there (return
about -4); recalling the cue gives 0."""


def test_recurrent_sac_learns_to_recall_a_cue_where_sac_cannot() -> None:
    common = {"learning_rate": 3e-3, "gamma": 0.5, "learning_starts": 100, "buffer_size": 10_000}
    returns = {}
    for name in ("recurrent", "memoryless"):
        env = make_vec_env(CueRecall, n_envs=1, seed=0)
        if name == "recurrent":
            policy_kwargs = {
                "cell": "cfc",
                "hidden_size": 16,
                "backbone_units": 32,
                "net_arch": [32, 32],
            }
            model = RecurrentSAC(
                "MlpPolicy", env, batch_size=16, sequence_length=3, burn_in=2, seed=0,
                policy_kwargs=policy_kwargs, **common,
            )  # fmt: skip
        else:
            model = SAC(
                "MlpPolicy",
                env,
                batch_size=64,
                seed=0,
                policy_kwargs={"net_arch": [32, 32]},
                **common,
            )
        model.learn(CUE_STEPS)
        evaluation = make_vec_env(CueRecall, n_envs=2, seed=1000)
        returns[name], _ = evaluate_policy(
            model, evaluation, n_eval_episodes=50, deterministic=True
        )
    assert returns["recurrent"] > CUE_THRESHOLD, returns
    assert returns["memoryless"] < CUE_THRESHOLD, returns
