"""SequenceExtractor: layouts, equality with running the cell by hand, every SB3 algorithm."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium import spaces
from stable_baselines3 import A2C, DQN, PPO, SAC, TD3
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.vec_env import DummyVecEnv, VecFrameStack, VecNormalize

import cfc_rl.envs  # noqa: F401  (registers the task ids)
from cfc_rl.nn import CELLS, time_input
from cfc_rl.sb3 import (
    SequenceExtractor,
    WindowLayout,
    sequence_extractor_kwargs,
    stack_sizes_allowed_by_bounds,
)


def small(cell: str) -> dict:
    """Keyword arguments of a small ``cell`` for SequenceExtractor."""
    extra = {"backbone_units": 16} if cell.startswith(("cfc", "cfs")) else {}
    return {"hidden_size": 8, **extra, **({"ode_unfolds": 2} if cell == "ltc" else {})}


def history_space(frames: int = 4, features: int = 3) -> spaces.Dict:
    return spaces.Dict(
        {
            "obs": spaces.Box(-np.inf, np.inf, (frames, features), np.float32),
            "dt": spaces.Box(0, np.inf, (frames, 1), np.float32),
            "valid": spaces.Box(0, 1, (frames, 1), np.float32),
        }
    )


def test_layouts_are_read_from_the_space() -> None:
    flat = spaces.Box(-1, 1, (12,), np.float32)
    assert WindowLayout.from_space(flat, 4) == WindowLayout(4, 3, False, False)
    assert WindowLayout.from_space(history_space(), None) == WindowLayout(4, 3, True, True)
    stacked_dict = spaces.Dict(
        {"obs": spaces.Box(-1, 1, (12,), np.float32), "dt": spaces.Box(0, 1, (4,), np.float32)}
    )
    assert WindowLayout.from_space(stacked_dict, 4) == WindowLayout(4, 3, True, False)


@pytest.mark.parametrize(
    ("space", "n_stack", "message"),
    [
        (spaces.Box(-1, 1, (12,), np.float32), None, "needs n_stack"),
        (spaces.Box(-1, 1, (12,), np.float32), 5, "n_stack=5 does not divide the observation"),
        (spaces.Box(-1, 1, (3, 4, 5), np.float32), None, "expected a flat Box of n_stack frames"),
        (spaces.Discrete(3), None, "cannot read Discrete"),
        (spaces.Dict({"x": spaces.Box(-1, 1, (3,))}), None, "expected a flat Box"),
        (history_space(), 3, "n_stack=3 but the observation holds 4 frames"),
    ],
)
def test_unreadable_spaces_say_what_was_expected(space, n_stack, message) -> None:
    with pytest.raises(ValueError, match=message):
        SequenceExtractor(space, n_stack=n_stack)


def _two_value_stack(env_id: str = "cfc_rl/CartPole-P-v1", n_stack: int = 4) -> VecFrameStack:
    """A VecFrameStack of an environment whose observation has two values."""
    return VecFrameStack(make_vec_env(env_id, n_envs=1, seed=0), n_stack=n_stack)


def test_an_n_stack_that_contradicts_the_bounds_is_an_error() -> None:
    """The reported case: 4 stacked frames of a 2-value observation (different bounds per
    value) read with n_stack=8 were taken as 8 frames of 1 value."""
    env = _two_value_stack()
    assert env.observation_space.shape == (8,)
    with pytest.raises(
        ValueError,
        match=r"n_stack=8 contradicts the observation's bounds: .* one frame of 1 value, but "
        r"low/high show at most 4 frames of 2 values \(n_stack can be 1, 2, 4\)",
    ):
        SequenceExtractor(env.observation_space, n_stack=8)
    assert SequenceExtractor(env.observation_space, n_stack=4).layout == WindowLayout(
        4, 2, False, False
    )


def test_bounds_allow_the_stack_sizes_of_both_frame_layouts() -> None:
    """SB3's VecFrameStack repeats each bound n_stack times in place; frames stacked oldest
    first (gymnasium's FrameStackObservation, flattened) tile them. Both tell the frame
    size; bounds equal everywhere tell nothing."""
    low, high = np.array([-4.8, -0.4], np.float32), np.array([4.8, 0.4], np.float32)
    repeated = spaces.Box(np.repeat(low, 4), np.repeat(high, 4))
    tiled = spaces.Box(np.tile(low, 4), np.tile(high, 4))
    assert stack_sizes_allowed_by_bounds(repeated) == [1, 2, 4]
    assert stack_sizes_allowed_by_bounds(tiled) == [1, 2, 4]
    assert stack_sizes_allowed_by_bounds(spaces.Box(-1, 1, (8,))) == [1, 2, 4, 8]
    # Only the high bounds differ: they decide.
    assert stack_sizes_allowed_by_bounds(spaces.Box(-1, np.tile(high, 3))) == [1, 3]
    frame_stack = gym.wrappers.FlattenObservation(
        gym.wrappers.FrameStackObservation(gym.make("cfc_rl/CartPole-P-v1"), 4)
    )
    assert stack_sizes_allowed_by_bounds(frame_stack.observation_space) == [1, 2, 4]
    with pytest.raises(ValueError, match="at most 4 frames of 2 values"):
        SequenceExtractor(frame_stack.observation_space, n_stack=8)
    dict_space = spaces.Dict({"obs": tiled, "dt": spaces.Box(0, np.inf, (8,))})
    with pytest.raises(ValueError, match="n_stack=8 contradicts"):
        SequenceExtractor(dict_space, n_stack=8)


def test_kwargs_for_an_environment_take_n_stack_from_its_frame_stack() -> None:
    env = VecNormalize(_two_value_stack())  # the frame stack need not be the outermost wrapper
    kwargs = sequence_extractor_kwargs(env, cell="ltc", hidden_size=8, ode_unfolds=2)
    assert kwargs == {"cell": "ltc", "hidden_size": 8, "n_stack": 4, "ode_unfolds": 2}
    assert sequence_extractor_kwargs(env, n_stack=4)["n_stack"] == 4
    extractor = SequenceExtractor(env.observation_space, **kwargs)
    assert extractor.layout == WindowLayout(4, 2, False, False)
    model = PPO(
        "MlpPolicy",
        env,
        n_steps=16,
        batch_size=16,
        policy_kwargs={
            "features_extractor_class": SequenceExtractor,
            "features_extractor_kwargs": sequence_extractor_kwargs(env, hidden_size=8),
        },
    )
    assert model.policy.features_extractor.layout.frames == 4


def test_kwargs_for_an_environment_reject_an_n_stack_its_frame_stack_contradicts() -> None:
    # Pendulum-P's two values share their bounds, so the space alone cannot tell 4 frames of
    # 2 values from 8 of 1: only the environment can.
    env = _two_value_stack("cfc_rl/Pendulum-P-v1")
    assert stack_sizes_allowed_by_bounds(env.observation_space) == [1, 2, 4, 8]
    with pytest.raises(
        ValueError, match="n_stack=8 but the environment's VecFrameStack stacks 4 frames"
    ):
        sequence_extractor_kwargs(env, n_stack=8)
    assert sequence_extractor_kwargs(env)["n_stack"] == 4


def test_kwargs_for_an_environment_without_a_frame_stack() -> None:
    flat = make_vec_env("cfc_rl/Pendulum-P-v1", n_envs=1, seed=0)
    with pytest.raises(
        ValueError, match="found no VecFrameStack among the wrappers of DummyVecEnv to read n_stack"
    ):
        sequence_extractor_kwargs(flat)
    history = DummyVecEnv([lambda: gym.make("cfc_rl/Pendulum-P-v1", irregular=(1, 3), history=4)])
    assert sequence_extractor_kwargs(history, hidden_size=8) == {"cell": "cfc", "hidden_size": 8}


def test_unknown_cell_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match="unknown cell 'mamba'; known cells: cfc"):
        SequenceExtractor(spaces.Box(-1, 1, (12,), np.float32), cell="mamba", n_stack=4)


def test_frame_stack_layout_equals_running_the_cell_on_the_frames() -> None:
    torch.manual_seed(0)
    extractor = SequenceExtractor(spaces.Box(-1, 1, (12,), np.float32), n_stack=4, hidden_size=5)
    obs = torch.randn(6, 12)
    expected, _ = extractor.cell(obs.reshape(6, 4, 3))
    torch.testing.assert_close(extractor(obs), expected[:, -1])
    assert extractor.features_dim == 5


@pytest.mark.parametrize("cell", sorted(CELLS))
def test_history_layout_skips_padding_and_feeds_dt(cell: str) -> None:
    """The features equal running the cell on the real frames only, with their Δt (as
    timespans, or as an input feature for LSTM and GRU)."""
    torch.manual_seed(0)
    extractor = SequenceExtractor(history_space(), cell=cell, **small(cell))
    obs = torch.randn(3, 4, 3)
    dt = torch.rand(3, 4, 1) + 0.1
    valid = torch.ones(3, 4, 1)
    real_from = [0, 2, 3]  # sample b has padding before frame real_from[b]
    for b, start in enumerate(real_from):
        valid[b, :start] = 0
        obs[b, :start] = 0
        dt[b, :start] = 0  # as HistoryWindow pads: a zero Δt must not break LTC
    features = extractor({"obs": obs, "dt": dt, "valid": valid})
    assert torch.isfinite(features).all()
    for b, start in enumerate(real_from):
        x, timespans = time_input(extractor.cell, obs[b : b + 1, start:], dt[b : b + 1, start:, 0])
        assert (timespans is None) == (not extractor.cell.uses_timespans)
        y, _ = extractor.cell(x, timespans=timespans)
        torch.testing.assert_close(features[b], y[0, -1], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("cell", sorted(CELLS))
def test_the_cell_itself_receives_gradients(cell: str) -> None:
    """A loss on the features reaches every parameter of the cell, not only the heads after
    it, on both layouts."""
    torch.manual_seed(0)
    flat = SequenceExtractor(
        spaces.Box(-1, 1, (12,), np.float32), n_stack=4, cell=cell, **small(cell)
    )
    history = SequenceExtractor(history_space(), cell=cell, **small(cell))
    valid = torch.ones(5, 4, 1)
    valid[1, :2] = 0.0
    observations = {"obs": torch.randn(5, 4, 3), "dt": torch.rand(5, 4, 1) + 0.1, "valid": valid}
    for extractor, obs in ((flat, torch.randn(5, 12)), (history, observations)):
        head = torch.nn.Linear(extractor.features_dim, 1)
        head(extractor(obs)).square().mean().backward()
        for name, param in extractor.cell.named_parameters():
            assert param.grad is not None and param.grad.abs().sum() > 0, f"{cell}: {name}"


def _pendulum_stack():
    return VecFrameStack(make_vec_env("cfc_rl/Pendulum-P-v1", n_envs=2, seed=0), n_stack=4)


ALGORITHMS = {
    "ppo": lambda env, kw: PPO("MlpPolicy", env, n_steps=64, batch_size=64, n_epochs=2, **kw),
    "a2c": lambda env, kw: A2C("MlpPolicy", env, n_steps=8, **kw),
    "sac": lambda env, kw: SAC(
        "MlpPolicy", env, learning_starts=64, batch_size=32, buffer_size=1000, **kw
    ),
    "td3": lambda env, kw: TD3(
        "MlpPolicy", env, learning_starts=64, batch_size=32, buffer_size=1000, **kw
    ),
    "dqn": lambda env, kw: DQN(
        "MlpPolicy", env, learning_starts=64, batch_size=32, buffer_size=1000, **kw
    ),
}


@pytest.mark.parametrize("cell", sorted(CELLS))
@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
def test_every_algorithm_trains_saves_and_reloads(algorithm: str, cell: str, tmp_path) -> None:
    if algorithm == "dqn":
        env = VecFrameStack(make_vec_env("cfc_rl/CartPole-P-v1", n_envs=2, seed=0), n_stack=4)
    else:
        env = _pendulum_stack()
    policy_kwargs = {
        "features_extractor_class": SequenceExtractor,
        "features_extractor_kwargs": {"cell": cell, "n_stack": 4, **small(cell)},
    }
    if algorithm in ("ppo", "a2c"):
        # Both settings of the shared extractor work; alternate them across cells.
        policy_kwargs["share_features_extractor"] = cell != "ltc"
    model = ALGORITHMS[algorithm](env, {"policy_kwargs": policy_kwargs, "seed": 0})
    extractors = [m for m in model.policy.modules() if isinstance(m, SequenceExtractor)]
    assert extractors and all(isinstance(e.cell, CELLS[cell].cls) for e in extractors)
    # The cells an optimiser trains (not the target networks' copies): every parameter of
    # each must move, so gradients reach the cell itself and not only the heads after it.
    optimised = {
        id(param)
        for module in model.policy.modules()
        if isinstance(getattr(module, "optimizer", None), torch.optim.Optimizer)
        for group in module.optimizer.param_groups
        for param in group["params"]
    }
    trained = [e.cell for e in extractors if id(next(e.cell.parameters())) in optimised]
    assert trained
    before = [[p.detach().clone() for p in c.parameters()] for c in trained]
    model.learn(160)
    for cell_before, trained_cell in zip(before, trained, strict=True):
        for (name, param), old in zip(trained_cell.named_parameters(), cell_before, strict=True):
            assert not torch.equal(param, old), f"{algorithm}/{cell}: {name} did not move"

    model.save(tmp_path / "model.zip")
    loaded = type(model).load(tmp_path / "model.zip", env=env)
    obs = env.reset()
    for _ in range(5):
        action, _ = model.predict(obs, deterministic=True)
        np.testing.assert_array_equal(loaded.predict(obs, deterministic=True)[0], action)
        obs, *_ = env.step(action)


def test_history_window_with_sac_and_separate_extractors(tmp_path) -> None:
    env = make_vec_env(
        "cfc_rl/Pendulum-P-v1", n_envs=1, seed=0, env_kwargs={"irregular": (1, 3), "history": 4}
    )
    model = SAC(
        "MultiInputPolicy",
        env,
        learning_starts=32,
        batch_size=16,
        buffer_size=500,
        seed=0,
        policy_kwargs={
            "features_extractor_class": SequenceExtractor,
            "features_extractor_kwargs": {"cell": "cfc", "hidden_size": 8, "backbone_units": 8},
        },
    )
    model.learn(80)
    model.save(tmp_path / "sac.zip")
    loaded = SAC.load(tmp_path / "sac.zip")
    obs = env.reset()
    np.testing.assert_array_equal(
        loaded.predict(obs, deterministic=True)[0], model.predict(obs, deterministic=True)[0]
    )
