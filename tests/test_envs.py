"""The cfc_rl/... tasks and their wrappers.

Task ids: registration, P/V layouts against the simulator, check_env, errors. Wrappers:
check_env, seeding, irregular time, history windows, noise, drop-out, flicker.
"""

from __future__ import annotations

import warnings

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import cfc_rl.envs as cenvs
from cfc_rl.envs import (
    SPLITS,
    TASKS,
    Flicker,
    HistoryWindow,
    IrregularTime,
    MaskObservation,
    SensorDropout,
    SensorNoise,
    TimeInfo,
    base_dt,
    make_task,
    observation_split,
    register_tasks,
    task_spec,
)

ALL_WRAPPERS = dict(flicker=0.2, noise=0.1, dropout=0.1, irregular=(1, 4), history=4)

# Warnings that check_env gives for any MuJoCo task or any wrapped env; anything else fails.
_EXPECTED_WARNINGS = (
    "minimum value is -infinity",
    "maximum value is infinity",
    "symmetric and normalized space",
    "is different from the unwrapped version",
)


# MuJoCo writes MUJOCO_LOG.TXT into the working directory: keep it out of the repository.
pytestmark = pytest.mark.usefixtures("mujoco_log_outside_the_repo")


def checked(env: gym.Env) -> None:
    """check_env, failing on any warning beyond the expected ones (obs outside its space, ...)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_env(env, skip_render_check=True)
    unexpected = [
        str(w.message) for w in caught if not any(e in str(w.message) for e in _EXPECTED_WARNINGS)
    ]
    assert not unexpected, unexpected


def test_expected_ids_are_registered() -> None:
    mujoco = [
        "HalfCheetah",
        "Hopper",
        "Walker2d",
        "Ant",
        "InvertedPendulum",
        "InvertedDoublePendulum",
        "Swimmer",
        "Reacher",
    ]
    expected = {
        "cfc_rl/CartPole-P-v1",
        "cfc_rl/Pendulum-P-v1",
        "cfc_rl/MountainCarContinuous-P-v0",
        *(f"cfc_rl/{name}-{part}-v5" for name in mujoco for part in "PV"),
    }
    assert set(TASKS) == expected
    assert expected <= set(gym.registry)


def test_registration_is_idempotent() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        register_tasks()
        register_tasks()
    assert not caught
    assert sum(i.startswith("cfc_rl/") for i in gym.registry) == len(TASKS)


@pytest.mark.parametrize("base_id", list(SPLITS))
def test_split_partitions_the_observation(base_id: str) -> None:
    split = SPLITS[base_id]
    kept = [*split.positions, *split.velocities, *split.dropped]
    assert sorted(kept) == list(range(split.obs_size))
    for part in split.parts:
        assert list(split.indices(part)) == sorted(split.indices(part)), "Gymnasium's order"
    env = gym.make(base_id, **split.env_kwargs)
    assert env.observation_space.shape == (split.obs_size,)
    env.close()


def _state_parts(base_id: str, u: gym.Env) -> tuple[np.ndarray, np.ndarray]:
    """Positions and velocities computed from the simulator state, independently of SPLITS."""
    if base_id == "CartPole-v1":
        x, x_dot, th, th_dot = u.state
        return np.array([x, th]), np.array([x_dot, th_dot])
    if base_id == "Pendulum-v1":
        th, th_dot = u.state
        return np.array([np.cos(th), np.sin(th)]), np.array([th_dot])
    if base_id == "MountainCarContinuous-v0":
        return np.array(u.state[:1]), np.array(u.state[1:])
    qpos, qvel = u.data.qpos.copy(), u.data.qvel.copy()
    if base_id in ("HalfCheetah-v5",):
        return qpos[1:], qvel
    if base_id in ("Hopper-v5", "Walker2d-v5"):
        return qpos[1:], np.clip(qvel, -10, 10)
    if base_id in ("Ant-v5", "Swimmer-v5"):
        return qpos[2:], qvel
    if base_id == "InvertedPendulum-v5":
        return qpos, qvel
    if base_id == "InvertedDoublePendulum-v5":
        angles = qpos[1:]
        return np.concatenate([qpos[:1], np.sin(angles), np.cos(angles)]), np.clip(qvel, -10, 10)
    if base_id == "Reacher-v5":
        to_target = (u.get_body_com("fingertip") - u.get_body_com("target"))[:2]
        angles = qpos[:2]
        return np.concatenate([np.cos(angles), np.sin(angles), qpos[2:4], to_target]), qvel[:2]
    raise AssertionError(f"no reference for {base_id}")


@pytest.mark.parametrize("task_id", list(TASKS))
def test_kept_values_are_the_simulator_positions_or_velocities(task_id: str) -> None:
    spec = task_spec(task_id)
    env = gym.make(task_id)
    env.action_space.seed(1)
    obs, _ = env.reset(seed=1)
    for t in range(12):
        positions, velocities = _state_parts(spec.base_id, env.unwrapped)
        expected = positions if spec.part == "P" else velocities
        np.testing.assert_allclose(obs, expected, rtol=1e-6, atol=1e-6, err_msg=f"step {t}")
        obs, _, terminated, truncated, _ = env.step(env.action_space.sample())
        if terminated or truncated:
            obs, _ = env.reset()
    env.close()


@pytest.mark.parametrize("task_id", list(TASKS))
def test_observation_is_the_full_observation_at_the_indices(task_id: str) -> None:
    spec = task_spec(task_id)
    masked = gym.make(task_id)
    full = gym.make(spec.base_id, **spec.env_kwargs)
    actions = full.action_space
    actions.seed(3)
    obs, _ = masked.reset(seed=3)
    full_obs, _ = full.reset(seed=3)
    for t in range(40):
        assert obs.dtype == full_obs.dtype
        np.testing.assert_array_equal(obs, full_obs[list(spec.indices)], err_msg=f"step {t}")
        action = actions.sample()
        obs, reward, terminated, truncated, _ = masked.step(action)
        full_obs, full_reward, full_term, full_trunc, _ = full.step(action)
        assert (reward, terminated, truncated) == (full_reward, full_term, full_trunc)
        if terminated or truncated:
            obs, _ = masked.reset(seed=100 + t)
            full_obs, _ = full.reset(seed=100 + t)
    masked.close()
    full.close()


@pytest.mark.parametrize("task_id", list(TASKS))
def test_check_env_passes(task_id: str) -> None:
    env = gym.make(task_id)
    checked(env)
    env.close()


@pytest.mark.parametrize("task_id", ["cfc_rl/Pendulum-P-v1", "cfc_rl/Hopper-V-v5"])
def test_check_env_passes_with_every_wrapper(task_id: str) -> None:
    env = gym.make(task_id, **ALL_WRAPPERS)
    assert isinstance(env.observation_space, gym.spaces.Dict)
    checked(env)
    env.close()


@pytest.mark.parametrize(
    ("task_id", "dt"),
    [
        ("cfc_rl/CartPole-P-v1", 0.02),  # tau
        ("cfc_rl/Pendulum-P-v1", 0.05),  # dt
        ("cfc_rl/MountainCarContinuous-P-v0", 1.0),  # no time step: one step is 1.0
        ("cfc_rl/Hopper-P-v5", 0.008),  # timestep 0.002 x frame_skip 4
        ("cfc_rl/HalfCheetah-V-v5", 0.05),
    ],
)
def test_every_task_reports_dt_in_info(task_id: str, dt: float) -> None:
    env = gym.make(task_id)
    _, info = env.reset(seed=0)
    assert info["dt"] == pytest.approx(dt)
    _, _, _, _, info = env.step(env.action_space.sample())
    assert info["dt"] == pytest.approx(dt)
    env.close()


def test_env_kwargs_reach_the_base_env() -> None:
    env = gym.make("cfc_rl/HalfCheetah-P-v5", env_kwargs={"ctrl_cost_weight": 0.5})
    assert env.unwrapped._ctrl_cost_weight == 0.5
    env.close()


def test_layout_kwargs_cannot_change() -> None:
    with pytest.raises(ValueError, match="include_cfrc_ext_in_observation"):
        gym.make("cfc_rl/Ant-P-v5", env_kwargs={"include_cfrc_ext_in_observation": True})
    with pytest.raises(ValueError, match="exclude_current_positions_from_observation"):
        gym.make(
            "cfc_rl/Hopper-V-v5", env_kwargs={"exclude_current_positions_from_observation": False}
        )


def test_unknown_task_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"cfc_rl/Foo-P-v5.*cfc_rl/Pendulum-P-v1"):
        make_task("cfc_rl/Foo-P-v5")
    # A real Gymnasium env without a P/V split.
    with pytest.raises(ValueError, match=r"Humanoid-v5.*Hopper-v5"):
        observation_split("Humanoid-v5")
    with pytest.raises(ValueError, match="cfc_rl/Humanoid-P-v5"):
        task_spec("cfc_rl/Humanoid-P-v5")


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"flicker": 1.5}, "flicker"),
        ({"flicker": -0.1}, "flicker"),
        ({"dropout": 2}, "dropout"),
        ({"flicker": True}, "flicker"),
        ({"noise": -1.0}, "noise"),
        ({"noise": float("nan")}, "noise"),
        ({"irregular": (4, 1)}, "min_repeat"),
        ({"irregular": (0, 2)}, "min_repeat"),
        ({"irregular": 3}, "irregular"),
        ({"history": 0}, "history"),
        ({"flikcer": 0.1}, "flikcer"),
    ],
)
def test_bad_kwargs_raise_value_error_naming_them(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        gym.make("cfc_rl/Pendulum-P-v1", **kwargs)
    with pytest.raises(ValueError, match=name):
        make_task("cfc_rl/Pendulum-P-v1", **kwargs)


def test_make_task_wraps_plain_gymnasium_ids() -> None:
    env = make_task("Pendulum-v1", noise=0.05, history=2)
    assert env.observation_space["obs"].shape == (2, 3)
    obs, info = env.reset(seed=0)
    assert info["dt"] == pytest.approx(0.05)
    assert obs["valid"].ravel().tolist() == [0.0, 1.0]
    env.close()


def test_gym_make_can_import_the_package_itself() -> None:
    env = gym.make("cfc_rl.envs:cfc_rl/CartPole-P-v1")
    assert env.observation_space.shape == (2,)
    env.close()


def test_package_exports() -> None:
    for name in cenvs.__all__:
        assert hasattr(cenvs, name), name


# ---- wrappers ------------------------------------------------------------------------------

WRAPPERS = {
    "mask": lambda env: MaskObservation(env, [0, 2]),
    "noise": lambda env: SensorNoise(env, 0.1),
    "dropout": lambda env: SensorDropout(env, 0.3),
    "flicker": lambda env: Flicker(env, 0.3),
    "time_info": TimeInfo,
    "irregular": lambda env: IrregularTime(env, 1, 3),
    "history": lambda env: HistoryWindow(env, 3),
    # the observation wrappers on IrregularTime's Dict, and a history over it
    "noise_on_dict": lambda env: SensorNoise(IrregularTime(env, 1, 3), 0.1),
    "flicker_on_dict": lambda env: Flicker(IrregularTime(env, 2, 2), 0.5),
    "history_on_dict": lambda env: HistoryWindow(SensorDropout(IrregularTime(env, 1, 3), 0.2), 2),
}


def _rollout(env: gym.Env, seed: int, steps: int) -> list:
    """Observations, rewards, flags and infos of a seeded rollout with seeded random actions."""
    env.action_space.seed(seed)
    obs, info = env.reset(seed=seed)
    out = [(obs, info)]
    for _ in range(steps):
        obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
        out.append((obs, reward, terminated, truncated, info))
        if terminated or truncated:
            out.append(env.reset())
    return out


def _same(a: object, b: object) -> bool:
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, np.ndarray):
        return np.array_equal(a, b)
    return a == b


@pytest.mark.parametrize("name", list(WRAPPERS))
def test_check_env_passes_for_each_wrapper(name: str) -> None:
    # CartPole-v1 has bounded observations and terminates early: bounds and resets get checked.
    env = WRAPPERS[name](gym.make("CartPole-v1"))
    checked(env)
    env.close()


def test_check_env_passes_on_a_mujoco_env() -> None:
    env = HistoryWindow(
        Flicker(SensorNoise(IrregularTime(gym.make("Swimmer-v5"), 1, 3), 0.1), 0.2), 3
    )
    checked(env)
    env.close()


def test_same_seed_same_trajectory_with_every_wrapper() -> None:
    first = _rollout(gym.make("cfc_rl/CartPole-P-v1", **ALL_WRAPPERS), seed=7, steps=150)
    second = _rollout(gym.make("cfc_rl/CartPole-P-v1", **ALL_WRAPPERS), seed=7, steps=150)
    other = _rollout(gym.make("cfc_rl/CartPole-P-v1", **ALL_WRAPPERS), seed=8, steps=150)
    assert _same(first, second)
    assert not _same(first, other)
    # A seeded reset of the same instance reproduces it too (the wrapper streams are re-seeded).
    env = gym.make("cfc_rl/CartPole-P-v1", **ALL_WRAPPERS)
    _rollout(env, seed=1, steps=30)
    assert _same(_rollout(env, seed=7, steps=150), first)


def test_wrappers_leave_the_physics_alone() -> None:
    """Wrapper randomness must not draw from the base env's generator (initial states)."""
    plain = gym.make("cfc_rl/Pendulum-P-v1")
    noisy = gym.make("cfc_rl/Pendulum-P-v1", noise=0.5, flicker=0.5)
    plain.reset(seed=4)
    noisy.reset(seed=4)
    for _ in range(3):
        plain.reset()
        noisy.reset()
        np.testing.assert_array_equal(plain.unwrapped.state, noisy.unwrapped.state)


@pytest.mark.parametrize(
    ("task_id", "lo", "hi"),
    # Pendulum's 200-step limit and Hopper's falls end episodes inside a control step.
    [("cfc_rl/Pendulum-P-v1", 1, 4), ("cfc_rl/Hopper-P-v5", 2, 5)],
)
def test_irregular_time_matches_stepping_the_base_env_by_hand(
    task_id: str, lo: int, hi: int
) -> None:
    env = gym.make(task_id, irregular=(lo, hi))
    by_hand = gym.make(task_id)
    dt = base_dt(by_hand)
    env.action_space.seed(0)
    obs, info = env.reset(seed=0)
    hand_obs, _ = by_hand.reset(seed=0)
    assert info["dt"] == pytest.approx(dt)
    assert obs["dt"][0] == pytest.approx(dt, rel=1e-6)
    full_repeats, episodes, base_steps = [], 0, 0
    for _ in range(150):
        np.testing.assert_array_equal(obs["obs"], hand_obs)
        action = env.action_space.sample()
        obs, reward, terminated, truncated, info = env.step(action)
        k = info["repeats"]
        hand_reward = 0.0
        for i in range(k):
            hand_obs, r, hand_term, hand_trunc, _ = by_hand.step(action)
            hand_reward += float(r)
            # the base episode ends exactly at the last base step of the control step, if at all
            assert (hand_term or hand_trunc) == (i == k - 1 and (terminated or truncated))
        assert (terminated, truncated) == (hand_term, hand_trunc)
        assert reward == pytest.approx(hand_reward, rel=1e-12, abs=1e-12)
        assert info["dt"] == pytest.approx(k * dt)
        assert obs["dt"].dtype == np.float32
        assert obs["dt"][0] == pytest.approx(k * dt, rel=1e-6)
        assert 1 <= k <= hi
        base_steps += k
        if truncated:  # cut short by the base TimeLimit, which counts base steps
            assert base_steps == by_hand.spec.max_episode_steps
        if terminated or truncated:
            episodes += 1
            base_steps = 0
            obs, _ = env.reset(seed=episodes)
            hand_obs, _ = by_hand.reset(seed=episodes)
        else:
            full_repeats.append(k)
    assert episodes >= 1
    assert set(full_repeats) == set(range(lo, hi + 1)), "every k in the range, and only those"


def test_irregular_time_dt_is_untouched_by_the_observation_wrappers() -> None:
    env = gym.make("cfc_rl/Walker2d-V-v5", irregular=(1, 3), noise=1.0, dropout=0.5, flicker=0.5)
    dt = base_dt(env)
    env.reset(seed=0)
    for _ in range(30):
        obs, _, terminated, truncated, info = env.step(env.action_space.sample())
        k = obs["dt"][0] / dt
        assert k == pytest.approx(round(k), abs=1e-4) and 1 <= round(k) <= 3
        assert obs["dt"][0] == pytest.approx(info["dt"], rel=1e-6)
        if terminated or truncated:
            env.reset()


def test_flicker_blanks_whole_frames_at_rate_p() -> None:
    env = Flicker(gym.make("Pendulum-v1"), 0.4)
    env.reset(seed=0)
    blank = []
    for _ in range(500):
        obs, *_ = env.step(env.action_space.sample())
        assert np.all(obs == 0) or np.all(obs != 0)  # never partly blank
        blank.append(bool(np.all(obs == 0)))
    assert 0.33 < np.mean(blank) < 0.47
    never = Flicker(gym.make("Pendulum-v1"), 0.0)
    always = Flicker(gym.make("Pendulum-v1"), 1.0)
    assert np.all(never.reset(seed=0)[0] != 0)
    assert np.all(always.reset(seed=0)[0] == 0)


def test_dropout_zeroes_entries_independently_at_rate_p() -> None:
    env = SensorDropout(gym.make("Pendulum-v1"), 0.25)
    env.reset(seed=0)
    zeros = np.array([env.step(env.action_space.sample())[0] == 0 for _ in range(600)])
    assert 0.20 < zeros.mean() < 0.30
    # independent entries: some frames partly dropped, not only whole frames
    assert np.any(zeros.any(axis=1) & ~zeros.all(axis=1))


def test_noise_is_zero_mean_with_the_given_sigma() -> None:
    clean = gym.make("Pendulum-v1")
    noisy = SensorNoise(gym.make("Pendulum-v1"), 0.2)
    clean.reset(seed=0)
    noisy.reset(seed=0)
    clean.action_space.seed(0)
    diffs = []
    for _ in range(400):
        action = clean.action_space.sample()
        diffs.append(noisy.step(action)[0] - clean.step(action)[0])
    diffs = np.array(diffs)
    assert np.all(np.abs(diffs.mean(axis=0)) < 0.04)
    np.testing.assert_allclose(diffs.std(axis=0), 0.2, rtol=0.15)
    assert noisy.observation_space.dtype == np.float32
    assert np.isinf(noisy.observation_space.high).all()


def test_zeroing_wrappers_widen_bounds_to_contain_zero() -> None:
    env = gym.make("MountainCarContinuous-v0")
    env.unwrapped.observation_space = gym.spaces.Box(
        np.array([0.1, -0.07], np.float32), np.array([0.6, 0.07], np.float32)
    )
    for wrapper in (Flicker(env, 1.0), SensorDropout(env, 1.0), HistoryWindow(env, 2)):
        space = wrapper.observation_space
        box = space["obs"] if isinstance(space, gym.spaces.Dict) else space
        assert np.all(box.low <= 0) and np.all(box.high >= 0)


def test_history_window_layout() -> None:
    inner = gym.make("cfc_rl/Pendulum-P-v1", irregular=(1, 3))
    env = HistoryWindow(gym.make("cfc_rl/Pendulum-P-v1", irregular=(1, 3)), 3)
    space = env.observation_space
    assert space["obs"].shape == (3, 2)
    assert space["dt"].shape == (3, 1)
    assert space["valid"].shape == (3, 1)
    inner.action_space.seed(0)
    frames = [inner.reset(seed=0)[0]]
    obs, _ = env.reset(seed=0)
    # before the episode's first step: two padding rows, then the reset frame (dt = one base step)
    np.testing.assert_array_equal(obs["valid"].ravel(), [0, 0, 1])
    np.testing.assert_array_equal(obs["dt"].ravel()[:2], [0, 0])
    np.testing.assert_array_equal(obs["obs"][:2], np.zeros((2, 2)))
    assert obs["dt"][2, 0] == pytest.approx(0.05)
    for t in range(5):
        action = inner.action_space.sample()
        frames.append(inner.step(action)[0])
        obs, *_ = env.step(action)
        window = frames[-3:]
        pad = 3 - len(window)
        np.testing.assert_array_equal(obs["obs"][pad:], [f["obs"] for f in window], f"step {t}")
        np.testing.assert_array_equal(obs["dt"][pad:, 0], [f["dt"][0] for f in window])
        np.testing.assert_array_equal(obs["valid"].ravel(), [0] * pad + [1] * len(window))
    # a reset clears the window
    obs, _ = env.reset(seed=1)
    np.testing.assert_array_equal(obs["valid"].ravel(), [0, 0, 1])


def test_history_window_on_a_box_reads_info_dt_or_base_dt() -> None:
    # with TimeInfo (every registered task): info["dt"]
    env = gym.make("cfc_rl/CartPole-P-v1", history=4)
    obs, _ = env.reset(seed=0)
    obs, *_ = env.step(env.action_space.sample())
    np.testing.assert_allclose(obs["dt"].ravel(), [0, 0, 0.02, 0.02])
    assert obs["obs"].shape == (4, 2)
    # on a bare env without info["dt"]: the base step
    bare = HistoryWindow(gym.make("Pendulum-v1"), 2)
    obs, _ = bare.reset(seed=0)
    np.testing.assert_allclose(obs["dt"].ravel(), [0, 0.05])


def test_history_window_returns_fresh_arrays() -> None:
    env = HistoryWindow(gym.make("Pendulum-v1"), 2)
    first, _ = env.reset(seed=0)
    kept = {k: v.copy() for k, v in first.items()}
    env.step(env.action_space.sample())
    for key in kept:
        np.testing.assert_array_equal(first[key], kept[key])


@pytest.mark.parametrize(
    ("make", "name"),
    [
        (lambda env: Flicker(env, 1.1), "p"),
        (lambda env: SensorDropout(env, -0.5), "p"),
        (lambda env: SensorNoise(env, -1.0), "sigma"),
        (lambda env: IrregularTime(env, 3, 2), "min_repeat"),
        (lambda env: IrregularTime(env, 0, 2), "min_repeat"),
        (lambda env: HistoryWindow(env, 0), "k"),
        (lambda env: MaskObservation(env, [0, 7]), "out of range"),
        (lambda env: MaskObservation(env, []), "empty"),
    ],
)
def test_wrapper_arguments_are_checked(make, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        make(gym.make("Pendulum-v1"))


def test_wrappers_refuse_observations_they_cannot_read() -> None:
    with pytest.raises(TypeError, match="Box"):
        Flicker(gym.make("FrozenLake-v1"), 0.1)


def test_vecnormalize_leaves_dt_alone() -> None:
    """The reason for the Dict: SB3's VecNormalize can normalise "obs" and keep "dt" exact."""
    vec_env = pytest.importorskip("stable_baselines3.common.vec_env")
    venv = vec_env.DummyVecEnv([lambda: gym.make("cfc_rl/Pendulum-P-v1", irregular=(1, 4))] * 2)
    venv = vec_env.VecNormalize(venv, norm_obs_keys=["obs"], norm_reward=False)
    venv.seed(0)
    venv.reset()
    for _ in range(20):
        obs, _, _, infos = venv.step(np.zeros((2, 1), dtype=np.float32))
        for i, info in enumerate(infos):
            assert obs["dt"][i, 0] == pytest.approx(info["dt"], rel=1e-6)
            assert round(info["dt"] / 0.05) in (1, 2, 3, 4)
