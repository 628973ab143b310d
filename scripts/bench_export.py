"""One control step of an exported CfC policy in onnxruntime (and TorchScript) against
Stable-Baselines3's ``model.predict``, on one CPU thread; writes results/export_speed_cpu.md.

    python scripts/bench_export.py [--run RUN] [--steps 2000] [--rounds 3]

A control step goes from the raw observation to the action: for SB3 that is
``VecNormalize.normalize_obs`` then ``model.predict(obs, state, episode_start,
deterministic=True)``; for the exported files one call with the statistics folded in (the
numpy inputs built as a control loop builds them). The observations are those of a real
rollout of the run's evaluation environment, replayed through every path; the rounds are
interleaved and each figure is the median over all steps of all rounds. Without ``--run`` a
RecurrentPPO agent of ``agents/ppo_cfc.yaml`` (64 units, 128-unit backbone) is trained for a
few hundred steps on ``envs/pendulum_p_irregular.yaml`` in a temporary folder: speed does not
depend on the weights.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime
import torch
from stable_baselines3.common.vec_env import VecNormalize

from cfc_rl.experiment.evaluate import load_run
from cfc_rl.experiment.export import export_run
from cfc_rl.experiment.runs import machine_description
from cfc_rl.experiment.train import train

ROOT = Path(__file__).resolve().parent.parent


def _record(run: Path, steps: int) -> tuple[list[dict[str, np.ndarray]], list[float]]:
    """Raw inputs of ``steps`` consecutive control steps (one environment, episodes starting
    where they do), and the time of each SB3 control step."""
    model, env = load_run(run, n_envs=1, device="cpu")
    normalize = env
    while not isinstance(normalize, VecNormalize):
        normalize = normalize.venv
    env.reset()
    start, state, rows, times = np.ones(1, dtype=bool), None, [], []
    for _ in range(steps):
        raw = normalize.get_original_obs()
        rows.append({"raw": raw, "start": start.astype(np.float32)})
        begin = time.perf_counter()
        action, state = model.predict(
            normalize.normalize_obs(raw), state=state, episode_start=start, deterministic=True
        )
        times.append(time.perf_counter() - begin)
        _, _, start, _ = env.step(action)
    env.close()
    return rows, times


def _replay_sb3(run: Path, rows: list[dict]) -> list[float]:
    model, env = load_run(run, n_envs=1, device="cpu")
    normalize = env
    while not isinstance(normalize, VecNormalize):
        normalize = normalize.venv
    state, times = None, []
    for row in rows:
        begin = time.perf_counter()
        _, state = model.predict(
            normalize.normalize_obs(row["raw"]),
            state=state,
            episode_start=row["start"] > 0.5,
            deterministic=True,
        )
        times.append(time.perf_counter() - begin)
    env.close()
    return times


def _feeds(row: dict, state: np.ndarray, dtypes: dict[str, np.dtype]) -> dict[str, np.ndarray]:
    raw = row["raw"]
    feeds = {
        "obs": (raw["obs"] if isinstance(raw, dict) else raw).astype(dtypes["obs"]),
        "state": state,
        "episode_start": row["start"],
    }
    if "dt" in dtypes:
        feeds["dt"] = raw["dt"].reshape(1, 1).astype(np.float32)
    return feeds


def _replay_onnx(result: dict, rows: list[dict]) -> list[float]:
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(
        result["path"], options, providers=["CPUExecutionProvider"]
    )
    dtypes = {i["name"]: np.dtype(i["dtype"]) for i in result["inputs"]}
    state = np.zeros((1, result["state"]["size"]), dtypes["state"])
    times = []
    for row in rows:
        begin = time.perf_counter()
        _, state = session.run(None, _feeds(row, state, dtypes))
        times.append(time.perf_counter() - begin)
    return times


def _replay_torchscript(result: dict, rows: list[dict]) -> list[float]:
    module = torch.jit.load(result["path"])
    dtypes = {i["name"]: np.dtype(i["dtype"]) for i in result["inputs"]}
    names = [i["name"] for i in result["inputs"]]
    state = torch.zeros(1, result["state"]["size"])
    times = []
    with torch.no_grad():
        for row in rows:
            begin = time.perf_counter()
            feeds = _feeds(row, state.numpy(), dtypes)
            _, state = module(*(torch.from_numpy(feeds[n]) for n in names))
            times.append(time.perf_counter() - begin)
    return times


def _default_run(folder: Path) -> Path:
    overrides = {"hyperparams": {"n_steps": 64, "batch_size": 64, "n_epochs": 1}}
    return train(
        ROOT / "agents" / "ppo_cfc.yaml",
        ROOT / "envs" / "pendulum_p_irregular.yaml",
        steps=256,
        out=folder,
        overrides=overrides,
    ).root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default=None, help="a run folder (default: train a CfC agent)")
    parser.add_argument("--steps", type=int, default=2000, help="control steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "results" / "export_speed_cpu.md"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    began = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(args.run) if args.run else _default_run(Path(tmp))
        onnx = export_run(run, format="onnx", out=Path(tmp) / "policy.onnx")
        script = export_run(run, format="torchscript", out=Path(tmp) / "policy.pt")
        rows, first = _record(run, args.steps)
        samples = {"sb3": first, "onnx": [], "torchscript": []}
        for r in range(args.rounds):
            if r:
                samples["sb3"] += _replay_sb3(run, rows)
            samples["onnx"] += _replay_onnx(onnx, rows)
            samples["torchscript"] += _replay_torchscript(script, rows)
    medians = {key: statistics.median(values) * 1e6 for key, values in samples.items()}
    labels = {
        "sb3": "SB3: VecNormalize.normalize_obs + model.predict",
        "onnx": "exported ONNX, onnxruntime (1 thread)",
        "torchscript": "exported TorchScript (torch.jit.load, 1 thread)",
    }
    table = [
        "| control step | median µs | speed-up over predict |",
        "|---|---|---|",
        *(
            f"| {labels[key]} | {medians[key]:.0f} | {medians['sb3'] / medians[key]:.2f}x |"
            for key in labels
        ),
    ]
    cell = onnx.get("cell") or "?"
    text = "\n".join(
        [
            f"# One control step of an exported {cell} policy (cpu)",
            "",
            f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
            f"- torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, "
            f"Python {platform.python_version()}",
            f"- device: cpu, {machine_description('cpu')}; threads: 1",
            f"- policy: {onnx['algorithm']} {onnx['policy']} ({cell}), state of "
            f"{onnx['state']['size']}, inputs {', '.join(i['name'] for i in onnx['inputs'])}; "
            f"run {'given' if args.run else 'agents/ppo_cfc.yaml on pendulum_p_irregular'}",
            f"- {args.rounds} interleaved rounds of {args.steps} steps of a rollout (batch 1); "
            f"took {time.perf_counter() - began:.0f} s; reproduce with: "
            f"`python scripts/bench_export.py --steps {args.steps} --rounds {args.rounds}`",
            "",
            *table,
            "",
        ]
    )
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
