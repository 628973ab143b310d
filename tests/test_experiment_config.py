"""Agent files: every shipped agent and task file validates; bad files name file and key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cfc_rl.envs import ConfigError, load_task_config
from cfc_rl.experiment.config import (
    AgentConfig,
    load_agent_config,
    make_schedule,
    resolve_agent,
)

ROOT = Path(__file__).resolve().parent.parent
AGENT_FILES = sorted((ROOT / "agents").glob("*.yaml"))
TASK_FILES = sorted((ROOT / "envs").glob("*.yaml"))
REQUIRED_AGENTS = {
    "ppo_cfc", "ppo_cfc_nogate", "ppo_cfs", "ppo_cfc_mm", "ppo_ltc", "ppo_gru", "ppo_lstm",
    "ppo_mlp", "ppo_framestack", "sac_cfc", "sac_lstm", "sac_mlp",
}  # fmt: skip


def test_the_issue_s_agents_are_shipped() -> None:
    assert {path.stem for path in AGENT_FILES} >= REQUIRED_AGENTS


@pytest.mark.parametrize("path", AGENT_FILES, ids=lambda p: p.stem)
def test_every_shipped_agent_loads_and_resolves_for_every_task(path: Path) -> None:
    agent = load_agent_config(path)
    assert agent.name == path.stem
    for task_path in TASK_FILES:
        resolved = resolve_agent(agent, load_task_config(task_path))
        assert resolved.overrides == {}


@pytest.mark.parametrize("path", TASK_FILES, ids=lambda p: p.stem)
def test_every_shipped_task_loads(path: Path) -> None:
    assert load_task_config(path).id.startswith("cfc_rl/")


def test_overrides_apply_by_task_id_and_keep_the_rest() -> None:
    agent = load_agent_config(ROOT / "agents" / "ppo_cfc.yaml")
    cartpole = resolve_agent(agent, load_task_config(ROOT / "envs" / "cartpole_p.yaml"))
    pendulum = resolve_agent(agent, load_task_config(ROOT / "envs" / "pendulum_p_irregular.yaml"))
    assert cartpole.hyperparams["n_steps"] == 32
    assert pendulum.hyperparams["n_steps"] == 1024
    assert pendulum.hyperparams["use_sde"] is True
    assert pendulum.hyperparams["ent_coef"] == 0.0  # not overridden: kept
    assert pendulum.policy_kwargs == cartpole.policy_kwargs


def test_overrides_by_task_file_name_come_after_those_by_id(tmp_path: Path) -> None:
    data = {
        "algo": "ppo",
        "policy": "MlpPolicy",
        "overrides": {
            "cfc_rl/Pendulum-P-v1": {"hyperparams": {"n_steps": 64, "gamma": 0.9}},
            "pendulum_p_irregular": {"hyperparams": {"n_steps": 128}},
        },
    }
    agent = AgentConfig.from_dict(data, name="a")
    resolved = resolve_agent(agent, load_task_config(ROOT / "envs" / "pendulum_p_irregular.yaml"))
    assert resolved.hyperparams == {"n_steps": 128, "gamma": 0.9}


def test_linear_schedule() -> None:
    schedule = make_schedule("lin_0.001")
    assert schedule(1.0) == pytest.approx(0.001)
    assert schedule(0.25) == pytest.approx(0.00025)
    assert make_schedule(3e-4) == 3e-4


GOOD = {
    "algo": "recurrent_ppo",
    "policy": "RecurrentCellPolicy",
    "hyperparams": {"n_steps": 32},
    "policy_kwargs": {"cell": "cfc", "hidden_size": 8},
}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"learning_rat": 0.1}, r"unknown key learning_rat; expected one of algo"),
        ({"algo": "dqn"}, r"algo must be one of ppo, recurrent_ppo, sac, got 'dqn'"),
        ({"policy": "CnnPolicy"}, r"policy must be one of RecurrentCellPolicy, MlpLstmPolicy"),
        ({"hyperparams": {"n_step": 32}}, r"unknown key hyperparams.n_step; recurrent_ppo"),
        ({"hyperparams": {"n_steps": "32"}}, r"hyperparams.n_steps must be an integer, got '32'"),
        ({"hyperparams": {"gamma": True}}, r"hyperparams.gamma must be a number"),
        ({"hyperparams": {"learning_rate": "exp_1"}}, r"learning_rate must be a number or 'lin_"),
        ({"hyperparams": {"seed": 3}}, r"unknown key hyperparams.seed"),
        ({"policy_kwargs": {"cell": "mamba"}}, r"policy_kwargs.cell must be one of cfc, "),
        ({"policy_kwargs": {"hidden_size": 8}}, r"missing key policy_kwargs.cell"),
        ({"policy_kwargs": {"cell": "cfc", "activation_fn": "swish"}}, r"activation_fn must be"),
        ({"policy_kwargs": {"cell": "cfc", "net_arch": [64, "x"]}}, r"net_arch must be a list"),
        ({"wrappers": {"histroy": 8}}, r"unknown key wrappers.histroy; expected one of flicker"),
        ({"wrappers": {"flicker": 2.0}}, r"flicker"),
        ({"frame_stack": 0}, r"frame_stack must be a positive integer, got 0"),
        ({"normalize": "yes"}, r"normalize must be true or false"),
        (
            {"overrides": {"cfc_rl/Pendulum-P-v1": {"hyperparams": {"n_steps": 1.5}}}},
            r"overrides.cfc_rl/Pendulum-P-v1.hyperparams.n_steps must be an integer",
        ),
        (
            {"overrides": {"cfc_rl/Pendulum-P-v1": {"hyperparms": {}}}},
            r"unknown key overrides.cfc_rl/Pendulum-P-v1.hyperparms",
        ),
    ],
)
def test_bad_agent_files_name_the_file_and_the_key(tmp_path: Path, change, message) -> None:
    path = tmp_path / "bad_agent.yaml"
    path.write_text(yaml.safe_dump({**GOOD, **change}))
    with pytest.raises(ConfigError, match=message) as error:
        load_agent_config(path)
    assert str(error.value).startswith(f"{path}: ")


def test_invalid_yaml_and_non_mapping_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text("algo: [ppo\n")
    with pytest.raises(ConfigError, match=f"{path}: not valid YAML"):
        load_agent_config(path)
    path.write_text("- ppo\n")
    with pytest.raises(ConfigError, match=f"{path}: expected a mapping"):
        load_agent_config(path)


def test_bad_task_files_name_the_file_and_the_key(tmp_path: Path) -> None:
    path = tmp_path / "task.yaml"
    path.write_text("id: cfc_rl/CartPole-P-v1\ntrain: {n_env: 8}\n")
    with pytest.raises(ConfigError, match=f"{path}: unknown key train.n_env"):
        load_task_config(path)
