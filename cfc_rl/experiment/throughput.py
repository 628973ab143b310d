"""Training throughput of RecurrentPPO: env steps per second of each policy, same settings.

RecurrentPPO's cost is its training epochs: sb3-contrib's ``MlpLstmPolicy`` runs each padded
minibatch through its LSTM one time step at a time whenever a sequence starts an episode (they
almost all do), while :class:`~cfc_rl.sb3.RecurrentCellPolicy` runs it in one call. This
measures the effect end to end: rollouts and training on ``cfc_rl/Pendulum-P-v1`` with RL
Zoo's tuned ``ppo_lstm`` settings for PendulumNoVel, and reports each policy's steps per second
as a ratio to ``MlpLstmPolicy`` measured in the same process, interleaved round by round.

    python scripts/bench_ppo_throughput.py [--rounds 3] [--steps 4096] [--policies cfc lstm_sb3]
"""

from __future__ import annotations

import argparse
import datetime
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from sb3_contrib import RecurrentPPO
from stable_baselines3 import PPO
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.vec_env import VecNormalize
from torch import nn

import cfc_rl.envs  # noqa: F401  (registers the task ids)
from cfc_rl.experiment.bench import machine_description
from cfc_rl.experiment.runs import atomic_write_text
from cfc_rl.sb3 import RecurrentCellPolicy

TASK = "cfc_rl/Pendulum-P-v1"
# RL Zoo's ppo_lstm hyperparameters for PendulumNoVel-v1.
SETTINGS: dict[str, Any] = {
    "n_steps": 1024,
    "gae_lambda": 0.95,
    "gamma": 0.9,
    "n_epochs": 10,
    "ent_coef": 0.0,
    "learning_rate": 1e-3,
    "clip_range": 0.2,
    "use_sde": True,
    "sde_sample_freq": 4,
}
N_ENVS = 4
NET = {"ortho_init": False, "activation_fn": nn.ReLU, "net_arch": {"pi": [64], "vf": [64]}}

# name -> (algorithm, policy, extra policy kwargs)
POLICIES: dict[str, tuple[type, Any, dict[str, Any]]] = {
    "lstm_sb3": (RecurrentPPO, "MlpLstmPolicy", {"lstm_hidden_size": 64}),
    "cfc": (RecurrentPPO, RecurrentCellPolicy, {"cell": "cfc", "hidden_size": 64}),
    "lstm": (RecurrentPPO, RecurrentCellPolicy, {"cell": "lstm", "hidden_size": 64}),
    "ltc": (RecurrentPPO, RecurrentCellPolicy, {"cell": "ltc", "hidden_size": 64}),
    "mlp": (PPO, "MlpPolicy", {}),
}
BASELINE = "lstm_sb3"


def steps_per_second(name: str, steps: int, device: str, seed: int) -> float:
    """Train a fresh model for ``steps`` env steps and return steps per second."""
    algorithm, policy, extra = POLICIES[name]
    env = VecNormalize(make_vec_env(TASK, n_envs=N_ENVS, seed=seed))
    model = algorithm(
        policy, env, seed=seed, device=device, policy_kwargs={**NET, **extra}, **SETTINGS
    )
    start = time.perf_counter()
    model.learn(steps)
    elapsed = time.perf_counter() - start
    env.close()
    return model.num_timesteps / elapsed


def main(argv: list[str] | None = None) -> None:
    """Measure and print the table; write it to ``--out``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--policies", nargs="+", choices=list(POLICIES), default=["cfc", "mlp"])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median)")
    parser.add_argument("--steps", type=int, default=4096, help="env steps per measurement")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out", type=Path, default=None, help="default results/ppo_throughput_<device>.md"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    names = [BASELINE, *[name for name in args.policies if name != BASELINE]]

    rates: dict[str, list[float]] = {name: [] for name in names}
    started = time.perf_counter()
    for round_index in range(args.rounds):
        order = names[round_index % len(names) :] + names[: round_index % len(names)]
        for name in order:
            rate = steps_per_second(name, args.steps, args.device, args.seed)
            rates[name].append(rate)
            print(f"round {round_index + 1}: {name:<9} {rate:7.1f} steps/s", flush=True)
    elapsed = time.perf_counter() - started

    baseline = statistics.median(rates[BASELINE])
    rows = [
        "| policy | env steps/s (median) | ratio to MlpLstmPolicy |",
        "|---|---|---|",
    ]
    for name in names:
        median = statistics.median(rates[name])
        label = {"lstm_sb3": "sb3-contrib MlpLstmPolicy", "mlp": "PPO MlpPolicy (no memory)"}.get(
            name, f"RecurrentCellPolicy({name})"
        )
        rows.append(f"| {label} | {median:.0f} | {median / baseline:.2f}x |")
    command = shlex.join(["python", "scripts/bench_ppo_throughput.py", *(argv or sys.argv[1:])])
    report = "\n".join(
        [
            f"# RecurrentPPO training throughput on {TASK} ({args.device})",
            "",
            f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
            f"- torch {torch.__version__}, Python {platform.python_version()}",
            f"- device: {args.device}, {machine_description(args.device)}; threads: {args.threads}",
            f"- settings: RL Zoo ppo_lstm PendulumNoVel ({N_ENVS} envs, {SETTINGS}), hidden 64, "
            "CfC with its default 128-unit backbone",
            f"- {args.rounds} interleaved rounds of {args.steps} env steps each; took "
            f"{elapsed:.0f} s; reproduce with: `{command}`",
            "",
            *rows,
        ]
    )
    print("\n" + report)
    out = args.out or Path("results") / f"ppo_throughput_{args.device}.md"
    atomic_write_text(out, report + "\n")
    print(f"wrote {out}")
