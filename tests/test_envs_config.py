"""Task files (envs/*.yaml): every shipped file loads and builds; bad files name file and key."""

from __future__ import annotations

from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest

from cfc_rl.envs import TASKS, ConfigError, TaskConfig, load_task_config, make_task

ENVS_DIR = Path(__file__).resolve().parents[1] / "envs"
REQUIRED = [
    "pendulum_p.yaml",
    "cartpole_p.yaml",
    "pendulum_p_irregular.yaml",
    "halfcheetah_p.yaml",
    "hopper_p.yaml",
    "walker2d_p.yaml",
    "ant_p.yaml",
    "halfcheetah_v.yaml",
]


# MuJoCo writes MUJOCO_LOG.TXT into the working directory: keep it out of the repository.
pytestmark = pytest.mark.usefixtures("mujoco_log_outside_the_repo")


def test_required_task_files_exist() -> None:
    missing = [name for name in REQUIRED if not (ENVS_DIR / name).is_file()]
    assert not missing


@pytest.mark.parametrize("path", sorted(ENVS_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_task_file_loads_and_builds(path: Path) -> None:
    config = load_task_config(path)
    assert config.id in TASKS
    assert config.source == str(path)
    env = make_task(path)
    obs, info = env.reset(seed=0)
    assert obs in env.observation_space
    assert info["dt"] > 0
    env.close()


def test_irregular_task_file() -> None:
    config = load_task_config(ENVS_DIR / "pendulum_p_irregular.yaml")
    assert config.wrappers.irregular == (1, 4)
    env = make_task(config)
    assert set(env.observation_space.spaces) == {"obs", "dt"}
    # overrides replace the file's wrapper settings
    env = make_task(ENVS_DIR / "pendulum_p_irregular.yaml", irregular=None, history=2)
    assert env.observation_space["obs"].shape == (2, 2)


def test_make_task_from_a_dict_matches_gym_make() -> None:
    env = make_task({"id": "cfc_rl/CartPole-P-v1", "wrappers": {"noise": 0.1}})
    reference = gym.make("cfc_rl/CartPole-P-v1", noise=0.1)
    np.testing.assert_array_equal(env.reset(seed=5)[0], reference.reset(seed=5)[0])


def test_defaults() -> None:
    config = TaskConfig.from_dict({"id": "cfc_rl/Pendulum-P-v1"})
    assert config.wrappers.as_kwargs() == {
        "flicker": 0.0,
        "noise": 0.0,
        "dropout": 0.0,
        "irregular": None,
        "history": None,
    }


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "task.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "patterns"),
    [
        ("id: cfc_rl/Pendulum-P-v1\nbudget: 3\n", ["unknown key 'budget'", "train"]),
        ("id: cfc_rl/Pendulum-P-v1\nwrappers:\n  flicker: 2\n", ["wrappers.flicker", "[0, 1]"]),
        (
            "id: cfc_rl/Pendulum-P-v1\nwrappers:\n  irregular: [4, 2]\n",
            ["wrappers.irregular", "min_repeat"],
        ),
        ("id: cfc_rl/Pendulum-P-v1\nwrappers: [flicker]\n", ["wrappers", "mapping"]),
        ("id: cfc_rl/Pendulum-P-v1\nenv_kwargs: 3\n", ["env_kwargs", "mapping"]),
        ("id: cfc_rl/Foo-P-v5\n", ["id", "cfc_rl/Foo-P-v5", "cfc_rl/Pendulum-P-v1"]),
        ("wrappers: {}\n", ["missing key 'id'"]),
        ("- just\n- a list\n", ["mapping"]),
        ("id: [unclosed\n", ["not valid YAML"]),
    ],
)
def test_bad_task_files_name_file_key_and_expectation(
    tmp_path: Path, text: str, patterns: list[str]
) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as excinfo:
        load_task_config(path)
    message = str(excinfo.value)
    assert str(path) in message
    for pattern in patterns:
        assert pattern in message, message
    assert isinstance(excinfo.value, ValueError)


def test_make_task_rejects_unknown_overrides() -> None:
    with pytest.raises(ValueError, match="flikcer"):
        make_task(ENVS_DIR / "pendulum_p.yaml", flikcer=0.2)
