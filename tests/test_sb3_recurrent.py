"""RecurrentCellPolicy with the unmodified sb3_contrib.RecurrentPPO."""

from __future__ import annotations

import inspect
import re

import numpy as np
import pytest
import sb3_contrib
import torch
from gymnasium import spaces
from sb3_contrib import RecurrentPPO
from sb3_contrib.common.recurrent.policies import RecurrentActorCriticPolicy
from sb3_contrib.common.recurrent.type_aliases import RNNStates
from small_cells import small_cell_kwargs
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.utils import obs_as_tensor
from stable_baselines3.common.vec_env import VecNormalize

import cfc_rl.envs  # noqa: F401  (registers the task ids)
from cfc_rl.nn import CELLS, time_input
from cfc_rl.sb3 import ElapsedTimeExtractor, PolicyCell, RecurrentCellPolicy

SMALL = {"hidden_size": 8}
SMALL_CELL_KWARGS = small_cell_kwargs(backbone_units=16, ode_unfolds=2)


def small_model(cell: str, env, **kwargs) -> RecurrentPPO:
    policy_kwargs = {"cell": cell, **SMALL, **SMALL_CELL_KWARGS.get(cell, {})}
    policy_kwargs.update(kwargs.pop("policy_kwargs", {}))
    settings = {"n_steps": 32, "batch_size": 32, "n_epochs": 2, "seed": 0, **kwargs}
    return RecurrentPPO(RecurrentCellPolicy, env, policy_kwargs=policy_kwargs, **settings)


def rollout(model, env, steps: int = 25) -> np.ndarray:
    """What the policy computes along a rollout that carries the actor's and the critic's
    states and resets them at episode starts, as RecurrentPPO does when it acts: per step, the
    deterministic actions, their log-probabilities, the values and both states.

    The environments are reset with a seed, so that two models that act alike see the same
    observations (an unseeded reset of the VecEnv starts other episodes each time). Log-probs,
    values and states are compared, not the actions alone: a small policy's deterministic
    CartPole action is the same at every step, whatever the weights of its cells."""
    policy = model.policy
    env.seed(0)
    obs = env.reset()
    zeros = torch.zeros(1, env.num_envs, policy.lstm_actor.hidden_size, device=policy.device)
    states = RNNStates((zeros, zeros), (zeros, zeros))
    starts = torch.ones(env.num_envs, device=policy.device)
    recorded = []
    for _ in range(steps):
        with torch.no_grad():
            actions, values, log_prob, states = policy(
                obs_as_tensor(obs, policy.device), states, starts, deterministic=True
            )
        computed = [actions.reshape(env.num_envs, -1).float(), values, log_prob.reshape(-1, 1)]
        recorded.append(torch.cat([*computed, states.pi[0][0], states.vf[0][0]], dim=1).cpu())
        actions = actions.cpu().numpy()
        if isinstance(env.action_space, spaces.Box):
            actions = np.clip(actions, env.action_space.low, env.action_space.high)
        obs, _, dones, _ = env.step(actions)
        starts = torch.as_tensor(dones, dtype=torch.float32, device=policy.device)
    return torch.stack(recorded).numpy()


@pytest.mark.parametrize("cell", sorted(CELLS))
def test_every_cell_trains_predicts_with_state_and_reloads(cell: str, tmp_path) -> None:
    env = make_vec_env("cfc_rl/CartPole-P-v1", n_envs=2, seed=0)
    model = small_model(cell, env)
    assert isinstance(model.policy.lstm_actor, PolicyCell)
    assert isinstance(model.policy.lstm_critic, PolicyCell)
    before = [p.detach().clone() for p in model.policy.lstm_actor.parameters()]
    model.learn(128)
    after = list(model.policy.lstm_actor.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))

    obs = env.reset()
    _, state = model.predict(obs, deterministic=True)
    state_size = model.policy.lstm_actor.cell.state_size
    assert state[0].shape == (1, 2, state_size)
    # The state carries memory: the same observation with another state may act differently,
    # and an episode start wipes the state.
    _, state_again = model.predict(obs, state=state, deterministic=True)
    assert not np.allclose(state_again[0], state[0])
    _, restarted = model.predict(obs, state=state, episode_start=np.ones(2), deterministic=True)
    np.testing.assert_allclose(restarted[0], state[0], atol=1e-6)

    model.save(tmp_path / "model.zip")
    loaded = RecurrentPPO.load(tmp_path / "model.zip", env=env)
    np.testing.assert_array_equal(loaded.predict(obs, deterministic=True)[1][0], state[0])
    np.testing.assert_array_equal(rollout(loaded, env), rollout(model, env))


def _step_by_step(features, lstm_states, episode_starts, lstm: PolicyCell):
    """Reference: one call per time step, resetting by hand, as sb3-contrib's loop does."""
    hidden, unused = lstm_states
    n_seq = hidden.shape[1]
    x = features.reshape(n_seq, -1, lstm.input_size)
    starts = episode_starts.reshape(n_seq, -1)
    state, outputs = hidden[0], []
    for t in range(x.shape[1]):
        state = state * (1.0 - starts[:, t : t + 1])
        step, dt = x[:, t : t + 1], None
        if lstm.time_in_features:
            step, dt = step[..., :-1], step[..., -1]
        step, timespans = time_input(lstm.cell, step, dt)
        y, state = lstm.cell(step, state, timespans=timespans)
        outputs.append(y)
    y = torch.cat(outputs, dim=1)
    return y.reshape(-1, lstm.output_size), (state.unsqueeze(0), unused)


@pytest.mark.parametrize(
    ("cell", "env_kwargs"),
    [("cfc", {}), ("ltc", {"irregular": (1, 3)}), ("lstm", {}), ("ctrnn", {"irregular": (1, 3)})],
)
def test_one_call_training_path_equals_the_step_by_step_path(cell, env_kwargs, monkeypatch):
    task = "cfc_rl/Pendulum-P-v1" if env_kwargs else "cfc_rl/CartPole-P-v1"
    env = make_vec_env(task, n_envs=2, seed=0, env_kwargs=env_kwargs)
    model = small_model(cell, env)
    model.learn(64)  # fills the rollout buffer with episodes that start mid-sequence
    batch = next(model.rollout_buffer.get(48))
    starts = batch.episode_starts.reshape(len(batch.lstm_states.pi[0][0]), -1)
    assert starts[:, 0].any(), "the minibatch should hold sequences that start an episode"

    def loss_and_grads():
        model.policy.zero_grad()
        values, log_prob, entropy = model.policy.evaluate_actions(
            batch.observations, batch.actions, batch.lstm_states, batch.episode_starts
        )
        loss = values.square().mean() - log_prob.mean() - 0.1 * entropy.mean()
        loss.backward()
        grads = [p.grad.clone() for p in model.policy.parameters() if p.grad is not None]
        return loss.detach(), grads

    loss, grads = loss_and_grads()
    monkeypatch.setattr(RecurrentCellPolicy, "_process_sequence", staticmethod(_step_by_step))
    loss_ref, grads_ref = loss_and_grads()
    torch.testing.assert_close(loss, loss_ref, atol=1e-6, rtol=1e-5)
    assert len(grads) == len(grads_ref) and len(grads) > 4
    for grad, grad_ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(grad, grad_ref, atol=1e-5, rtol=1e-4)


# The cells of the benchmark's recurrent PPO agents, and the critic modes of the policy.
BENCHMARK_CELLS = ("cfc", "ltc", "ctrnn", "lstm", "gru")
CRITIC_MODES = {
    "critic_cell": {"enable_critic_cell": True},
    "linear_critic": {"enable_critic_cell": False},
    "shared_cell": {"shared_cell": True, "enable_critic_cell": False},
}
# Short episodes (TimeLimit in control steps), so that several end inside each rollout.
RESCORING_TASKS = {
    "cartpole_p": ("cfc_rl/CartPole-P-v1", {"max_episode_steps": 20}),
    "pendulum_p_irregular": (
        "cfc_rl/Pendulum-P-v1",
        {"irregular": (1, 4), "max_episode_steps": 12},
    ),
}


def _rescore_rollout_buffer(model: RecurrentPPO, coverage: dict[str, int]) -> None:
    """Re-score the rollout buffer exactly as RecurrentPPO.train does before its first
    gradient step, and compare with what the rollout stored: the ratio must be 1."""
    policy = model.policy
    policy.set_training_mode(True)
    for rollout_data in model.rollout_buffer.get(model.batch_size):
        actions = rollout_data.actions
        if isinstance(model.action_space, spaces.Discrete):
            actions = rollout_data.actions.long().flatten()
        mask = rollout_data.mask > 1e-8
        with torch.no_grad():
            values, log_prob, _ = policy.evaluate_actions(
                rollout_data.observations,
                actions,
                rollout_data.lstm_states,
                rollout_data.episode_starts,
            )
        torch.testing.assert_close(
            log_prob[mask], rollout_data.old_log_prob[mask], atol=1e-5, rtol=1e-5
        )
        torch.testing.assert_close(
            values.flatten()[mask], rollout_data.old_values[mask], atol=1e-5, rtol=1e-5
        )
        # What the minibatch asks of the policy: sequences that start an episode from the
        # previous episode's stored (non-zero) state, which must be reset, and sequences that
        # continue one from a stored state, which must be used.
        hidden = rollout_data.lstm_states.pi[0][0]
        first = rollout_data.episode_starts.reshape(len(hidden), -1)[:, 0] > 0.5
        stored = hidden.abs().amax(dim=1) > 0
        coverage["reset"] += int((first & stored).sum())
        coverage["carried"] += int((~first & stored).sum())


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("task", sorted(RESCORING_TASKS))
@pytest.mark.parametrize("critic", sorted(CRITIC_MODES))
@pytest.mark.parametrize("cell", BENCHMARK_CELLS)
def test_rescoring_the_rollout_buffer_gives_its_log_probs_and_values(cell, critic, task):
    """The invariant of recurrent PPO: before any gradient step, evaluate_actions on the
    buffer's padded minibatches (one call per minibatch, from the stored states, resetting at
    episode starts) gives the log-probs and values the step-by-step rollout recorded."""
    task_id, env_kwargs = RESCORING_TASKS[task]
    env = make_vec_env(task_id, n_envs=4, seed=0, env_kwargs=env_kwargs)
    if task == "pendulum_p_irregular":
        env = VecNormalize(env, norm_obs_keys=["obs"])
    policy_kwargs = {"net_arch": {"pi": [], "vf": [16]}, **CRITIC_MODES[critic]}
    model = small_model(cell, env, batch_size=48, policy_kwargs=policy_kwargs)
    coverage = {"rollouts": 0, "reset": 0, "carried": 0}
    train = model.train

    def rescore_then_train() -> None:
        _rescore_rollout_buffer(model, coverage)
        coverage["rollouts"] += 1
        train()

    model.train = rescore_then_train
    # Two rollouts: the second starts from the states the first left and follows a gradient
    # step, and the minibatches (48 of 128 steps) split episodes.
    model.learn(2 * model.n_steps * env.num_envs)
    assert coverage["rollouts"] == 2 and coverage["reset"] > 0 and coverage["carried"] > 0, coverage


def test_elapsed_time_reaches_the_cell_unnormalised() -> None:
    env = make_vec_env("cfc_rl/Pendulum-P-v1", n_envs=2, seed=0, env_kwargs={"irregular": (1, 4)})
    env = VecNormalize(env, norm_obs_keys=["obs"])
    model = small_model("cfc", env)
    assert isinstance(model.policy.pi_features_extractor, ElapsedTimeExtractor)
    seen: list[torch.Tensor] = []

    def record(module, args, kwargs):
        seen.append(kwargs["timespans"].detach().flatten())

    model.policy.lstm_actor.cell.register_forward_pre_hook(record, with_kwargs=True)
    model.learn(64)
    timespans = torch.cat(seen)
    timespans = timespans[timespans > 0]  # training minibatches pad sequences with zeros
    # Pendulum's base step is 0.05 s; an action lasts 1 to 4 of them.
    np.testing.assert_allclose(
        sorted(set(np.round(timespans.numpy(), 6))), [0.05, 0.1, 0.15, 0.2], rtol=1e-5
    )


def test_lstm_gets_elapsed_time_as_an_input_feature() -> None:
    env = make_vec_env("cfc_rl/Pendulum-P-v1", n_envs=1, seed=0, env_kwargs={"irregular": (1, 4)})
    for name in CELLS:
        policy_cell = small_model(name, env).policy.lstm_actor
        assert policy_cell.time_in_features and policy_cell.input_size == 3  # cos θ, sin θ, Δt
        # Continuous-time cells take Δt as timespans; LSTM and GRU as a third input.
        assert policy_cell.cell.input_size == (2 if policy_cell.cell.uses_timespans else 3)
    assert not small_model("lstm", env).policy.lstm_actor.cell.uses_timespans


@pytest.mark.parametrize(
    "policy_kwargs",
    [
        {"shared_cell": True, "enable_critic_cell": False},
        {"enable_critic_cell": False},
        {"share_features_extractor": False, "net_arch": {"pi": [16], "vf": [16]}},
    ],
)
def test_critic_options_of_recurrent_ppo(policy_kwargs, tmp_path) -> None:
    env = make_vec_env("cfc_rl/CartPole-P-v1", n_envs=2, seed=0)
    model = small_model("cfc", env, policy_kwargs=policy_kwargs)
    model.learn(64)
    expected_critic = policy_kwargs.get("enable_critic_cell", True)
    assert (model.policy.lstm_critic is not None) == expected_critic
    model.save(tmp_path / "model.zip")
    loaded = RecurrentPPO.load(tmp_path / "model.zip", env=env)
    np.testing.assert_array_equal(rollout(loaded, env, 10), rollout(model, env, 10))


def test_bad_policy_arguments_are_clear_errors() -> None:
    env = make_vec_env("cfc_rl/CartPole-P-v1", n_envs=1, seed=0)
    with pytest.raises(ValueError, match="unknown cell 'cfcc'; known cells"):
        small_model("cfcc", env)
    with pytest.raises(ValueError, match="shared_cell=True needs enable_critic_cell=False"):
        small_model("cfc", env, policy_kwargs={"shared_cell": True})
    with pytest.raises(TypeError, match="backbone_unit"):
        small_model("cfc", env, policy_kwargs={"backbone_unit": 3})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("cell", ["cfc", "ltc", "lstm"])
def test_training_runs_on_cuda_end_to_end(cell: str, tmp_path) -> None:
    env = make_vec_env("cfc_rl/Pendulum-P-v1", n_envs=2, seed=0, env_kwargs={"irregular": (1, 4)})
    model = small_model(cell, env, device="cuda")
    assert next(model.policy.parameters()).is_cuda
    model.learn(128)
    model.save(tmp_path / "model.zip")
    loaded = RecurrentPPO.load(tmp_path / "model.zip", env=env, device="cuda")
    np.testing.assert_allclose(rollout(loaded, env, 10), rollout(model, env, 10), atol=1e-5)


# What RecurrentCellPolicy re-creates of sb3-contrib's RecurrentActorCriticPolicy, whose
# __init__ it skips (that __init__ builds nn.LSTM modules), and what the rest of sb3-contrib
# reads from it.
RE_CREATED = {
    "lstm_actor",
    "lstm_critic",
    "lstm_output_dim",
    "lstm_hidden_state_shape",
    "shared_lstm",
    "enable_critic_lstm",
    "critic",
}
ONLY_FOR_THE_SKIPPED_INIT = {"lstm_kwargs"}  # the nn.LSTM arguments: cell_kwargs here
SEQUENCE_CALLERS = ("forward", "get_distribution", "predict_values", "evaluate_actions")


def _attribute_names(policy: ActorCriticPolicy) -> set[str]:
    return set(vars(policy)) | set(policy._modules) | set(policy._parameters)


def _reads(source: str, prefix: str = "self") -> set[str]:
    return set(re.findall(rf"\b{re.escape(prefix)}\.(\w+)", source))


def test_sb3_contrib_still_defines_and_uses_what_the_policy_re_creates() -> None:
    """Fails, naming the attribute and the sb3-contrib version, when sb3-contrib changes
    the private attributes RecurrentCellPolicy re-creates: it must then be updated."""
    where = f"sb3-contrib {sb3_contrib.__version__}"
    observations = spaces.Box(-1, 1, (3,), np.float32)
    actions = spaces.Box(-1, 1, (1,), np.float32)  # continuous: the policy has log_std too
    reference = RecurrentActorCriticPolicy(
        observations, actions, lambda _: 3e-4, lstm_hidden_size=8
    )
    plain = ActorCriticPolicy(observations, actions, lambda _: 3e-4)
    ours = RecurrentCellPolicy(observations, actions, lambda _: 3e-4, cell="cfc", **SMALL)

    # What sb3-contrib's __init__ sets beyond ActorCriticPolicy's: the known list, no more.
    added = _attribute_names(reference) - _attribute_names(plain)
    for name in sorted((RE_CREATED | ONLY_FOR_THE_SKIPPED_INIT) - added):
        pytest.fail(
            f"{where}: RecurrentActorCriticPolicy no longer sets `{name}`, which "
            "RecurrentCellPolicy re-creates (cfc_rl/sb3/recurrent.py): see what replaced it"
        )
    for name in sorted(added - RE_CREATED - ONLY_FOR_THE_SKIPPED_INIT):
        pytest.fail(
            f"{where}: RecurrentActorCriticPolicy.__init__ now sets `{name}`, which "
            "RecurrentCellPolicy (it skips that __init__) does not re-create"
        )
    for name in sorted(RE_CREATED):
        assert name in _attribute_names(ours), f"RecurrentCellPolicy lacks `{name}` ({where})"

    # Everything the class's other methods read exists on ours, and each re-created
    # attribute is still read by one of them.
    read: set[str] = set()
    for method_name, value in vars(RecurrentActorCriticPolicy).items():
        function = value.__func__ if isinstance(value, staticmethod) else value
        if method_name == "__init__" or not inspect.isfunction(function):
            continue
        names = _reads(inspect.getsource(function))
        read |= names
        for name in sorted(names):
            assert hasattr(ours, name), (
                f"{where}: RecurrentActorCriticPolicy.{method_name} reads `self.{name}`, which "
                "RecurrentCellPolicy does not define"
            )
    for name in sorted(RE_CREATED - {"enable_critic_lstm"} - read):  # that one: __init__ only
        pytest.fail(
            f"{where}: RecurrentActorCriticPolicy's methods no longer read `{name}`; "
            "RecurrentCellPolicy re-creates it for nothing: see what replaced it"
        )

    # The one-call training path replaces _process_sequence, which every sequence method calls.
    static = inspect.getattr_static(RecurrentActorCriticPolicy, "_process_sequence", None)
    assert isinstance(static, staticmethod), (
        f"{where}: RecurrentActorCriticPolicy._process_sequence is no longer a staticmethod"
    )
    parameters = list(inspect.signature(static.__func__).parameters)
    assert parameters == ["features", "lstm_states", "episode_starts", "lstm"], (
        f"{where}: _process_sequence now takes {parameters}"
    )
    for method_name in SEQUENCE_CALLERS:
        source = inspect.getsource(getattr(RecurrentActorCriticPolicy, method_name))
        assert "self._process_sequence(" in source, (
            f"{where}: RecurrentActorCriticPolicy.{method_name} no longer calls "
            "`_process_sequence`, which RecurrentCellPolicy overrides"
        )

    # RecurrentPPO reads the policy and its actor "LSTM" (buffer sizes).
    algorithm = inspect.getsource(RecurrentPPO)
    for name in sorted(_reads(algorithm, "self.policy")):
        assert hasattr(ours, name), f"{where}: RecurrentPPO reads `policy.{name}`"
    for name in sorted(_reads(algorithm, "lstm")):
        assert hasattr(ours.lstm_actor, name), (
            f"{where}: RecurrentPPO reads `policy.lstm_actor.{name}`, which PolicyCell lacks"
        )
