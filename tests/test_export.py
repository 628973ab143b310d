"""Exported policies (cfc_rl.experiment.export) against model.predict, on tiny trained runs.

Every agent kind is trained for 128 steps; its exported file (TorchScript, and ONNX run in
onnxruntime) is driven side by side with ``model.predict(..., deterministic=True)`` over whole
episodes of two environments at once, the state carried and episodes starting in the middle:
the actions, and the states where both sides have one, agree to 1e-5.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from gymnasium import spaces
from stable_baselines3.common.vec_env import VecNormalize

from cfc_rl.experiment import export
from cfc_rl.experiment.evaluate import evaluate_run, load_run
from cfc_rl.experiment.train import train

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")
ROOT = Path(__file__).resolve().parent.parent
ATOL = 1e-5
PPO = "hyperparams: {n_steps: 64, batch_size: 64, n_epochs: 1}\n"
# ortho_init: false (as the project's agents): actions of order 1, not 0.01, so that comparing
# them says something.
MLP = "policy: MlpPolicy\npolicy_kwargs: {net_arch: [8], ortho_init: false}\n"
SAC_MLP = "policy: MlpPolicy\npolicy_kwargs: {net_arch: [8]}\n"
SAC = "n_envs: 1\nhyperparams: {learning_starts: 64, batch_size: 32}\n"
REC_SAC = "hyperparams: {learning_starts: 64, batch_size: 4, sequence_length: 4, burn_in: 2}\n"
TINY_CELL = {"ltc": ", ode_unfolds: 2", "lstm": "", "gru": "", "ctrnn": ""}


def _cell_agent(cell: str) -> str:
    extra = TINY_CELL.get(cell, ", backbone_units: 8")
    return (
        "algo: recurrent_ppo\npolicy: RecurrentCellPolicy\n"
        f"policy_kwargs: {{cell: {cell}, hidden_size: 8, net_arch: {{pi: [], vf: [8]}}, "
        f"ortho_init: false{extra}}}\n" + PPO
    )


# name -> (agent file, task file): every policy kind the exporter knows, Box and Discrete
# actions, Δt read (irregular time) and a fixed control period.
AGENTS: dict[str, tuple[str, str]] = {
    **{
        cell: (_cell_agent(cell), "pendulum_p_irregular")
        for cell in ("cfc", "cfc_mm", "cfs", "ltc", "lstm", "ctrnn")
    },
    "gru": (_cell_agent("gru"), "cartpole_p"),
    "mlp_lstm": (
        "algo: recurrent_ppo\npolicy: MlpLstmPolicy\n"
        "policy_kwargs: {lstm_hidden_size: 8, net_arch: {pi: [], vf: [8]}, ortho_init: false}\n"
        + PPO,
        "pendulum_p_irregular",
    ),
    "ppo_mlp": ("algo: ppo\n" + MLP + PPO, "cartpole_p"),
    "ppo_stack": ("algo: ppo\nframe_stack: 3\n" + MLP + PPO, "pendulum_p"),
    "ppo_stack_dt": ("algo: ppo\nframe_stack: 2\n" + MLP + PPO, "pendulum_p_irregular"),
    "sac_mlp": ("algo: sac\n" + SAC_MLP + SAC, "pendulum_p"),
    "sac_window": (
        "algo: sac\npolicy: MlpPolicy\nwrappers: {history: 4}\n"
        "features_extractor: {cell: cfc, hidden_size: 8, backbone_units: 8}\n"
        "policy_kwargs: {net_arch: [8]}\n" + SAC,
        "pendulum_p_irregular",
    ),
    "sac_window_fixed": (
        "algo: sac\npolicy: MlpPolicy\nwrappers: {history: 3}\n"
        "features_extractor: {cell: gru, hidden_size: 8}\npolicy_kwargs: {net_arch: [8]}\n" + SAC,
        "pendulum_p",
    ),
    # RecurrentSAC: the actor's cell carries the state; Δt read, and a fixed period.
    "sac_rec": (
        "algo: recurrent_sac\npolicy: MlpPolicy\nn_envs: 1\n"
        "policy_kwargs: {cell: cfc, hidden_size: 8, backbone_units: 8, net_arch: [8]}\n" + REC_SAC,
        "pendulum_p_irregular",
    ),
    "sac_rec_lstm": (
        "algo: recurrent_sac\npolicy: MlpPolicy\nn_envs: 1\n"
        "policy_kwargs: {cell: lstm, hidden_size: 8, net_arch: [8]}\n" + REC_SAC,
        "pendulum_p",
    ),
    # MuJoCo observations are float64: the window keeps them so (a float64 state).
    "sac_window_mujoco": (
        "algo: sac\npolicy: MlpPolicy\nwrappers: {history: 2}\n"
        "features_extractor: {cell: ctrnn, hidden_size: 8}\npolicy_kwargs: {net_arch: [8]}\n" + SAC,
        "hopper_p",
    ),
}
# ONNX export (torch.export, then the ONNX translation) takes seconds per policy: one agent of
# each policy kind runs by default, the other cells (covered cell by cell in
# test_nn_tracing.py) with the slow tests.
ONNX_KINDS = (
    "cfc", "gru", "mlp_lstm", "ppo_mlp", "ppo_stack", "sac_mlp", "sac_window", "sac_window_fixed",
    "sac_window_mujoco", "sac_rec",
)  # fmt: skip
ONNX_CASES = [
    pytest.param(name, marks=() if name in ONNX_KINDS else pytest.mark.slow) for name in AGENTS
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("export")
    shutil.copytree(ROOT / "agents" / "settings", folder / "settings")
    for task_name in {task for _, task in AGENTS.values()}:
        data = yaml.safe_load((ROOT / "envs" / f"{task_name}.yaml").read_text())
        data["train"] = {**data["train"], "total_timesteps": 128, "n_envs": 2}
        data["eval"] = {"episodes": 2, "every_steps": 128, "deterministic": True}
        (folder / f"{task_name}.yaml").write_text(yaml.safe_dump(data))
    made = {}
    for name, (agent, task_name) in AGENTS.items():
        (folder / f"{name}.yaml").write_text(agent)
        made[name] = train(
            folder / f"{name}.yaml", folder / f"{task_name}.yaml", seed=0, out=folder / "runs"
        ).root
    yield made
    torch.set_num_threads(threads)


_EXPORTS: dict[tuple[str, str], dict[str, Any]] = {}


def exported(runs: dict[str, Path], name: str, fmt: str) -> dict[str, Any]:
    """The export of a run in a format, made once per module."""
    if fmt == "onnx":
        for module in ("onnx", "onnxscript", "onnxruntime"):
            pytest.importorskip(module, reason=f"ONNX export needs {export.INSTALL_ONNX}")
    if (name, fmt) not in _EXPORTS:
        _EXPORTS[name, fmt] = export.export_run(runs[name], format=fmt)
    return _EXPORTS[name, fmt]


def _runner(result: dict[str, Any]):
    """A function of the inputs (numpy, in the order of the JSON) that runs the file."""
    if result["format"] == "torchscript":
        module = torch.jit.load(result["path"])

        def run_torchscript(*inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            with torch.no_grad():
                action, state = module(*(torch.as_tensor(x) for x in inputs))
            return action.numpy(), state.numpy()

        return run_torchscript
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    session = onnxruntime.InferenceSession(result["path"], options)
    names = [i["name"] for i in result["inputs"]]
    assert [i.name for i in session.get_inputs()] == names

    def run_onnx(*inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        action, state = session.run(None, dict(zip(names, inputs, strict=True)))
        return action, state

    return run_onnx


def _wrapper(env: Any, kind: type) -> Any:
    while not isinstance(env, kind):
        env = env.venv
    return env


def _part(result: dict[str, Any], state: np.ndarray, name: str) -> np.ndarray:
    part = next(p for p in result["state"]["parts"] if p["name"] == name)
    size = int(np.prod(part["shape"]))
    return state[:, part["offset"] : part["offset"] + size].reshape(-1, *part["shape"])


def drive(run: Path, result: dict[str, Any], n_envs: int = 2) -> dict[str, float]:
    """Run the exported file beside ``model.predict`` until every environment has finished an
    episode and gone 5 steps into the next; return the largest differences seen."""
    model, env = load_run(run, n_envs=n_envs, device="cpu")
    normalize = _wrapper(env, VecNormalize)
    call = _runner(result)
    names = [i["name"] for i in result["inputs"]]
    dtypes = {i["name"]: np.dtype(i["dtype"]) for i in result["inputs"]}
    part_names = [p["name"] for p in result["state"]["parts"]]
    window = "window_obs" in part_names
    obs = env.reset()
    starts = np.ones(n_envs, dtype=bool)
    predicted_state = None
    state = np.zeros((n_envs, result["state"]["size"]), dtypes["state"])
    finished, after, worst = np.zeros(n_envs, dtype=bool), 0, {}

    def record(key: str, a: np.ndarray, b: np.ndarray) -> None:
        assert a.shape == b.shape, (key, a.shape, b.shape)
        worst[key] = max(worst.get(key, 0.0), float(np.abs(a.astype(float) - b).max()))

    for _ in range(800):
        raw = normalize.get_original_obs()
        inputs = {
            "obs": (raw["obs"][:, -1] if window else raw["obs"]) if isinstance(raw, dict) else raw,
            "state": state,
            "episode_start": starts.astype(np.float32),
        }
        if "dt" in names:
            inputs["dt"] = (raw["dt"][:, -1] if window else raw["dt"]).reshape(n_envs, 1)
        action, state = call(*(np.asarray(inputs[n]).astype(dtypes[n]) for n in names))
        predicted, predicted_state = model.predict(
            obs, state=predicted_state, episode_start=starts, deterministic=True
        )
        record("action", action, predicted)
        if "cell" in part_names:  # RecurrentPPO's (h, c) per layer; RecurrentSAC's flat state
            cell_state = predicted_state[0][0] if isinstance(predicted_state, tuple) else None
            record(
                "state",
                _part(result, state, "cell"),
                predicted_state if cell_state is None else cell_state,
            )
        if "lstm_h" in part_names:
            record("state", _part(result, state, "lstm_h"), predicted_state[0].swapaxes(0, 1))
            record("state", _part(result, state, "lstm_c"), predicted_state[1].swapaxes(0, 1))
        if "stack_obs" in part_names:  # the stacked frames the policy saw
            stacked = obs if isinstance(obs, dict) else {"obs": obs}
            for key, value in stacked.items():
                record("state", _part(result, state, f"stack_{key}").reshape(n_envs, -1), value)
        if window:  # the HistoryWindow's frames, raw
            record("state", _part(result, state, "window_obs"), raw["obs"])
            record("state", _part(result, state, "window_dt"), raw["dt"])
            record("state", _part(result, state, "window_valid"), raw["valid"])
        obs, _, dones, _ = env.step(predicted)
        starts = dones
        finished |= dones
        after = after + 1 if finished.all() else 0
        if after == 5:
            break
    else:
        pytest.fail("an environment did not finish an episode in 800 steps")
    env.close()
    return worst


@pytest.mark.parametrize("name", list(AGENTS))
def test_torchscript_export_acts_as_predict(runs, name: str) -> None:
    result = exported(runs, name, "torchscript")
    worst = drive(runs[name], result)
    assert worst["action"] <= ATOL, worst
    assert worst.get("state", 0.0) <= ATOL, worst
    assert result["check"]["max_abs_diff"] <= ATOL


@pytest.mark.parametrize("name", ONNX_CASES)
def test_onnx_export_acts_as_predict_in_onnxruntime(runs, name: str) -> None:
    result = exported(runs, name, "onnx")
    worst = drive(runs[name], result)
    assert worst["action"] <= ATOL, worst
    assert worst.get("state", 0.0) <= ATOL, worst


def test_the_json_describes_the_file(runs) -> None:
    result = exported(runs, "cfc_mm", "torchscript")
    on_disk = json.loads(Path(result["metadata_path"]).read_text())
    assert {k: v for k, v in result.items() if k not in ("path", "metadata_path")} == on_disk
    assert [i["name"] for i in on_disk["inputs"]] == ["obs", "state", "dt", "episode_start"]
    assert on_disk["state"]["size"] == 16  # [h | c] of the actor's 8 units
    assert on_disk["control_period"] == {
        "fixed": False, "seconds": "read dt", "base_dt": 0.05, "repeats": [1, 4]
    }  # fmt: skip
    assert on_disk["action"]["low"] == [-2.0] and on_disk["action"]["high"] == [2.0]
    assert on_disk["observation"]["normalization"]["keys"] == ["obs"]
    assert on_disk["env"]["wrappers"]["irregular"] == [1, 4]

    fixed = exported(runs, "sac_window_fixed", "torchscript")
    assert [i["name"] for i in fixed["inputs"]] == ["obs", "state", "episode_start"]
    assert fixed["control_period"]["fixed"] and fixed["control_period"]["seconds"] == 0.05
    assert [p["name"] for p in fixed["state"]["parts"]] == [
        "window_obs", "window_dt", "window_valid"
    ]  # fmt: skip
    assert fixed["state"]["size"] == 3 * 2 + 3 + 3 and "history" not in fixed["env"]["wrappers"]
    assert fixed["action"]["mapping"].startswith("tanh")
    discrete = exported(runs, "ppo_mlp", "torchscript")
    assert discrete["state"]["size"] == 0 and discrete["action"]["dtype"] == "int64"


@pytest.mark.parametrize("name", ["cfc", "sac_window_fixed"])
def test_the_onnxruntime_loop_reproduces_the_evaluation(runs, name: str) -> None:
    result = exported(runs, name, "onnx")
    expected = evaluate_run(runs[name], episodes=3, device="cpu")["mean_return"]
    # The script imports neither torch nor Stable-Baselines3.
    code = (
        "import runpy, sys; sys.argv = sys.argv[1:]; "
        "runpy.run_path(sys.argv[0], run_name='__main__'); "
        "assert 'torch' not in sys.modules and 'stable_baselines3' not in sys.modules"
    )
    script = str(ROOT / "scripts" / "onnx_control_loop.py")
    output = subprocess.run(
        [sys.executable, "-c", code, script, result["path"], "--episodes", "3"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    mean = float(output.split("mean return ")[1].split()[0])
    # Monitor rounds each episode's return to 1e-6; the two sides batch differently.
    assert mean == pytest.approx(expected, abs=1e-4)


def test_an_unknown_policy_is_a_clear_error(runs, tmp_path, capsys) -> None:
    from stable_baselines3 import TD3

    parts = export.load_run_parts(runs["sac_mlp"])
    parts.model = TD3("MlpPolicy", "Pendulum-v1", device="cpu")
    with pytest.raises(export.ExportError, match=r"cannot export a TD3 policy TD3Policy: .*knows"):
        export.build_exported_policy(parts)

    parser = argparse.ArgumentParser()
    export.add_export_arguments(parser)
    args = parser.parse_args([str(runs["ppo_mlp"]), "--format", "torchscript"])
    args.out = str(tmp_path / "mlp.pt")
    assert export.export_command(args, parser) == 0
    printed = capsys.readouterr().out
    assert '"state"' in printed and (tmp_path / "mlp.pt.json").is_file()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        module = torch.jit.load(str(tmp_path / "mlp.pt"))
    action, state = module(torch.zeros(1, 2), torch.zeros(1, 0), torch.ones(1))
    assert action.dtype == torch.int64 and state.shape == (1, 0)


def test_onnx_without_its_packages_says_what_to_install(runs, monkeypatch, capsys) -> None:
    monkeypatch.setattr(export, "_installed", lambda module: module != "onnxruntime")
    parser = argparse.ArgumentParser()
    export.add_export_arguments(parser)
    args = parser.parse_args([str(runs["ppo_mlp"])])
    assert export.export_command(args, parser) == 2
    error = capsys.readouterr().err.strip()
    assert error == (
        "error: ONNX export needs onnxruntime: install them with pip install -e '.[export]'"
    )
    assert len(error.splitlines()) == 1


def test_unsupported_layouts_name_what_is_missing() -> None:
    with pytest.raises(export.ExportError, match=r"takes a Box or a Dict of 'obs'"):
        export._frame_pieces(spaces.Dict({"image": spaces.Box(0, 1, (2,))}))
    assert export._frame_pieces(spaces.Box(-1, 1, (3,))) == ((3,), False)


def test_a_file_that_fails_the_check_leaves_an_earlier_export(runs, tmp_path, monkeypatch) -> None:
    out = tmp_path / "mlp.pt"
    export.export_run(runs["ppo_mlp"], format="torchscript", out=out)
    before = {path.name: path.read_bytes() for path in tmp_path.iterdir()}
    assert set(before) == {"mlp.pt", "mlp.pt.json"}
    monkeypatch.setattr(export, "CHECK_ATOL", -1.0)  # no file can pass
    with pytest.raises(export.ExportError, match=r"away from the policy's .* not kept"):
        export.export_run(runs["ppo_mlp"], format="torchscript", out=out)
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir()} == before


def test_an_out_that_is_a_folder_is_refused_before_exporting(tmp_path, monkeypatch) -> None:
    def must_not_load(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the run was loaded")

    monkeypatch.setattr(export, "load_run_parts", must_not_load)
    with pytest.raises(export.ExportError, match=r"is a folder: give the file to write"):
        export.export_run(tmp_path / "run", format="torchscript", out=tmp_path)
    assert list(tmp_path.iterdir()) == []
