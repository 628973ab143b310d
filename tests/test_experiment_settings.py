"""Agent files, per-task settings and task files: every shipped file validates, settings are
found per task (and their absence is an error), bad files name the file and the key."""

from __future__ import annotations

from pathlib import Path

import gymnasium as gym
import pytest
import yaml
from sb3_contrib import RecurrentPPO

from cfc_rl.envs import ConfigError
from cfc_rl.experiment.settings import (
    AgentConfig,
    load_agent_config,
    load_settings,
    make_schedule,
    resolve_agent,
)
from cfc_rl.experiment.tasks import load_task
from cfc_rl.experiment.train import resolve
from cfc_rl.sb3 import RecurrentCellPolicy

ROOT = Path(__file__).resolve().parent.parent
AGENT_FILES = sorted((ROOT / "agents").glob("*.yaml"))
TASK_FILES = sorted((ROOT / "envs").glob("*.yaml"))
REQUIRED_AGENTS = {
    "ppo_cfc", "ppo_cfc_nogate", "ppo_cfs", "ppo_cfc_mm", "ppo_ltc", "ppo_gru", "ppo_lstm",
    "ppo_mlp", "ppo_framestack", "sac_cfc", "sac_lstm", "sac_mlp", "sac_rec_cfc", "sac_rec_ltc",
    "sac_rec_lstm", "sac_rec_gru",
}  # fmt: skip


def test_the_issue_s_agents_are_shipped() -> None:
    assert {path.stem for path in AGENT_FILES} >= REQUIRED_AGENTS


SETTINGS_FILES = sorted((ROOT / "agents" / "settings").glob("*.yaml"))


@pytest.mark.parametrize("path", AGENT_FILES, ids=lambda p: p.stem)
def test_every_shipped_agent_resolves_for_every_task_its_algorithm_can_run(path: Path) -> None:
    agent = load_agent_config(path)
    assert agent.name == path.stem
    assert agent.settings is not None and agent.settings.algo == agent.algo
    for task_path in TASK_FILES:
        task = load_task(task_path)
        if agent.algo in ("sac", "recurrent_sac") and task.id == "cfc_rl/CartPole-P-v1":
            with pytest.raises(ConfigError, match=f"no {agent.algo} settings for task cartpole_p"):
                resolve_agent(agent, task)
            continue
        resolved = resolve_agent(agent, task)
        assert resolved.overrides == {} and resolved.settings is None
        assert resolved.hyperparams or task.id in ("cfc_rl/Ant-P-v5",), task_path


@pytest.mark.parametrize("path", SETTINGS_FILES, ids=lambda p: p.stem)
def test_settings_files_validate_and_cover_every_shipped_task(path: Path) -> None:
    settings = load_settings(path, path.stem)
    for task_path in TASK_FILES:
        task = load_task(task_path)
        if path.stem in ("sac", "recurrent_sac") and task.id == "cfc_rl/CartPole-P-v1":
            assert settings.for_task(task) is None
        else:
            assert settings.for_task(task) is not None, task_path


def test_the_same_task_gets_different_settings_per_task_not_cartpole_s() -> None:
    """The issue's case: HalfCheetah trained with CartPole's PPO settings (n_steps 32). An agent
    outside the benchmark: the benchmark's agents carry tuned overrides per task."""
    agent_file = ROOT / "agents" / "ppo_cfc_nogate.yaml"
    agent, task = resolve(agent_file, ROOT / "envs" / "halfcheetah_p.yaml")
    assert agent.hyperparams["n_steps"] == 512 and agent.hyperparams["gamma"] == 0.98
    assert agent.policy_kwargs["log_std_init"] == -2.0
    assert agent.policy_kwargs["cell"] == "cfc_nogate"  # the agent's own keys are kept
    assert task.train.n_envs == 1 and task.train.normalize is True  # settings over task file
    cartpole, _ = resolve(agent_file, ROOT / "envs" / "cartpole_p.yaml")
    assert cartpole.hyperparams["n_steps"] == 32


def test_an_agent_on_a_task_without_settings_says_so(tmp_path: Path) -> None:
    (tmp_path / "settings").mkdir()
    (tmp_path / "settings" / "ppo.yaml").write_text("CartPole-v1: {hyperparams: {n_steps: 8}}\n")
    agent_file = tmp_path / "mlp.yaml"
    agent_file.write_text("algo: ppo\npolicy: MlpPolicy\n")
    agent = load_agent_config(agent_file)
    assert resolve_agent(agent, load_task("cfc_rl/CartPole-P-v1")).hyperparams == {"n_steps": 8}
    with pytest.raises(ConfigError) as error:
        resolve_agent(agent, load_task(ROOT / "envs" / "hopper_p.yaml"))
    message = str(error.value)
    assert "no ppo settings for task hopper_p (cfc_rl/Hopper-P-v5)" in message
    assert "'Hopper-v5'" in message and str(tmp_path / "settings" / "ppo.yaml") in message
    # without a settings file, the agent's overrides are the only source
    lone = tmp_path / "lone" / "mlp.yaml"
    lone.parent.mkdir()
    lone.write_text("algo: ppo\npolicy: MlpPolicy\noverrides: {hopper_p: {n_envs: 2}}\n")
    assert resolve_agent(load_agent_config(lone), load_task(ROOT / "envs" / "hopper_p.yaml"))
    with pytest.raises(ConfigError, match="no ppo settings for task cartpole_p"):
        resolve_agent(load_agent_config(lone), load_task(ROOT / "envs" / "cartpole_p.yaml"))


def test_precedence_settings_then_agent_then_overrides(tmp_path: Path) -> None:
    (tmp_path / "settings").mkdir()
    (tmp_path / "settings" / "ppo.yaml").write_text(
        "Pendulum-v1: {n_envs: 2, hyperparams: {n_steps: 8, gamma: 0.9, ent_coef: 0.1}}\n"
        "cfc_rl/Pendulum-P-v1: {hyperparams: {n_steps: 16}}\n"
        "pendulum_p_irregular: {hyperparams: {n_steps: 24}}\n"
    )
    agent_file = tmp_path / "a.yaml"
    agent_file.write_text(
        yaml.safe_dump(
            {
                "algo": "ppo",
                "policy": "MlpPolicy",
                "hyperparams": {"gamma": 0.95},
                "overrides": {"pendulum_p_irregular": {"hyperparams": {"ent_coef": 0.0}}},
            }
        )
    )
    plain, task = resolve(agent_file, ROOT / "envs" / "pendulum_p.yaml")
    assert plain.hyperparams == {"n_steps": 16, "gamma": 0.95, "ent_coef": 0.1}
    assert task.train.n_envs == 2
    irregular, _ = resolve(agent_file, ROOT / "envs" / "pendulum_p_irregular.yaml")
    assert irregular.hyperparams == {"n_steps": 24, "gamma": 0.95, "ent_coef": 0.0}


def test_bad_settings_files_name_the_file_and_the_entry(tmp_path: Path) -> None:
    path = tmp_path / "ppo.yaml"
    path.write_text("Pendulum-v1: {hyperparams: {n_step: 8}}\n")
    with pytest.raises(ConfigError, match=r"ppo.yaml: unknown key Pendulum-v1.hyperparams.n_step"):
        load_settings(path, "ppo")
    path.write_text("Pendulum-v1: {hyperparms: {}}\n")
    with pytest.raises(ConfigError, match=r"unknown key Pendulum-v1.hyperparms; expected one"):
        load_settings(path, "ppo")


@pytest.mark.parametrize("path", TASK_FILES, ids=lambda p: p.stem)
def test_every_shipped_task_loads(path: Path) -> None:
    assert load_task(path).id.startswith("cfc_rl/")


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
    resolved = resolve_agent(agent, load_task(ROOT / "envs" / "pendulum_p_irregular.yaml"))
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
        ({"algo": "dqn"}, r"algo must be one of ppo, recurrent_ppo, sac, recurrent_sac, got 'dqn'"),
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
        (
            {"policy_kwargs": {"cell": "ltc", "hidden_size": {"wiring": "autoncp", "unit": 8}}},
            r"policy_kwargs.hidden_size: wiring autoncp: .*unexpected keyword argument 'unit'",
        ),
        (
            {"policy_kwargs": {"cell": "ltc", "hidden_size": {"wiring": "ncps", "units": 8}}},
            r"policy_kwargs.hidden_size: a wiring needs wiring: one of fully_connected, ncp, "
            r"autoncp",
        ),
        (
            {"policy_kwargs": {"cell": "ltc", "hidden_size": "64"}},
            r"policy_kwargs.hidden_size must be an integer or a wiring",
        ),
        (
            {"policy_kwargs": {"cell": "cfc", "backbone_unitz": 32}},
            r"unknown key policy_kwargs.backbone_unitz; RecurrentCellPolicy with cell cfc "
            r"accepts .*backbone_units",
        ),
        (
            {"policy_kwargs": {"cell": "lstm", "backbone_units": 32}},
            r"unknown key policy_kwargs.backbone_units; RecurrentCellPolicy with cell lstm",
        ),
        (
            {
                "algo": "sac",
                "policy": "MlpPolicy",
                "hyperparams": {},
                "policy_kwargs": {},
                "features_extractor": {"cell": "ltc", "solvr": "rk4"},
            },
            r"unknown key features_extractor.solvr; SequenceExtractor with cell ltc accepts",
        ),
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


def test_a_wiring_in_an_agent_file_builds_the_wired_cells() -> None:
    """``hidden_size: {wiring: autoncp, ...}``: the actor and critic cells each get that
    circuit (the same one: the wiring's seed fixes it)."""
    agent = load_agent_config(ROOT / "agents" / "ppo_ltc_ncp.yaml")
    task = load_task(ROOT / "envs" / "pendulum_p.yaml")
    resolved = resolve_agent(agent, task)
    assert resolved.policy_kwargs["hidden_size"] == {
        "wiring": "autoncp",
        "units": 64,
        "output_size": 16,
    }
    model = RecurrentPPO(
        RecurrentCellPolicy, gym.make(task.id), n_steps=8, policy_kwargs=resolved.policy_kwargs
    )
    actor, critic = model.policy.lstm_actor.cell, model.policy.lstm_critic.cell
    assert actor.wiring is not critic.wiring
    assert type(actor.wiring).__name__ == "AutoNCP" and actor.units == 64
    assert actor.output_size == 16 and actor.ode_unfolds == 3
    assert (actor.sparsity_mask == critic.sparsity_mask).all()
    assert actor.sparsity_mask.count_nonzero() < 64 * 64 / 4


def test_the_accepted_hyperparameters_listed_are_public_ones(tmp_path: Path) -> None:
    path = tmp_path / "bad_agent.yaml"
    path.write_text(yaml.safe_dump({**GOOD, "hyperparams": {"n_stepz": 8}}))
    with pytest.raises(ConfigError) as error:
        load_agent_config(path)
    assert "n_steps" in str(error.value) and "_init_setup_model" not in str(error.value)


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
        load_task(path)


@pytest.mark.parametrize(
    ("text", "patterns"),
    [
        (
            "id: cfc_rl/Pendulum-P-v1\ntrain:\n  total_timesteps: 1e6\n",
            ["train.total_timesteps", "integer", "1e6"],
        ),
        ("id: cfc_rl/Pendulum-P-v1\ntrain:\n  normalize: 1\n", ["train.normalize", "true or"]),
        ("id: cfc_rl/Pendulum-P-v1\neval:\n  episode: 5\n", ["eval.episode", "episodes"]),
        ("id: cfc_rl/Pendulum-P-v1\nbudget: 3\n", ["unknown key 'budget'", "train"]),
    ],
)
def test_bad_budget_and_evaluation_sections_name_file_and_key(
    tmp_path: Path, text: str, patterns: list[str]
) -> None:
    path = tmp_path / "task.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as error:
        load_task(path)
    for pattern in [str(path), *patterns]:
        assert pattern in str(error.value), str(error.value)


def test_task_defaults_and_round_trip() -> None:
    task = load_task("cfc_rl/Pendulum-P-v1")
    assert task.eval.deterministic is True and task.train.n_envs == 1
    assert task.name == "cfc_rl_Pendulum-P-v1"
    irregular = load_task(ROOT / "envs" / "pendulum_p_irregular.yaml")
    assert irregular.train.total_timesteps == 100_000 and irregular.train.normalize is True
    again = load_task(irregular.as_dict())
    assert again.as_dict() == irregular.as_dict() and again.env.wrappers.irregular == (1, 4)
