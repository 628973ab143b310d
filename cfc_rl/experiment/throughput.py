"""Training throughput: env steps per second of each policy, same algorithm and settings.

RecurrentPPO's cost is its training epochs: sb3-contrib's ``MlpLstmPolicy`` runs each padded
minibatch through its LSTM one time step at a time whenever a sequence starts an episode (they
almost all do), while :class:`~cfc_rl.sb3.RecurrentCellPolicy` runs it in one call. This
measures the effect end to end: rollouts and training on ``cfc_rl/Pendulum-P-v1`` with RL
Zoo's tuned ``ppo_lstm`` settings for PendulumNoVel, and reports each policy's steps per second
as a ratio to ``MlpLstmPolicy`` measured in the same process, interleaved round by round.

    python scripts/bench_ppo_throughput.py [--rounds 3] [--steps 4096] [--policies cfc lstm_sb3]

With ``--algo sac`` it measures SAC instead (RL Zoo's Pendulum-v1 settings, one env, after the
random warm-up steps): the memoryless MLP against SAC with a cell over an 8-frame window of
observations (:class:`~cfc_rl.sb3.SequenceExtractor` on ``history=8``) and against
:class:`~cfc_rl.sb3.RecurrentSAC` (the state carried through the episode; ``sac_rec_<cell>``),
each ratio to the MLP: the price of memory in an off-policy algorithm, where every gradient
step runs the cells of the actor and both critics (and the target critics) over a window for
each of 256 samples, or over 32 sequences of 8 + 32 + 1 steps.
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
from stable_baselines3 import PPO, SAC
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.vec_env import VecNormalize
from torch import nn

import cfc_rl.envs  # noqa: F401  (registers the task ids)
from cfc_rl.experiment.runs import atomic_write_text, machine_description
from cfc_rl.sb3 import RecurrentCellPolicy, RecurrentSAC, SequenceExtractor

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

LTC_NCP = {"wiring": "autoncp", "units": 64, "output_size": 16}

# name -> (algorithm, policy, extra policy kwargs)
POLICIES: dict[str, tuple[type, Any, dict[str, Any]]] = {
    "lstm_sb3": (RecurrentPPO, "MlpLstmPolicy", {"lstm_hidden_size": 64}),
    "cfc": (RecurrentPPO, RecurrentCellPolicy, {"cell": "cfc", "hidden_size": 64}),
    "lstm": (RecurrentPPO, RecurrentCellPolicy, {"cell": "lstm", "hidden_size": 64}),
    "ltc": (RecurrentPPO, RecurrentCellPolicy, {"cell": "ltc", "hidden_size": 64}),
    # The cheaper LTC settings: a sparse NCP circuit of the same 64 neurons, fewer unfolds.
    "ltc_ncp": (RecurrentPPO, RecurrentCellPolicy, {"cell": "ltc", "hidden_size": LTC_NCP}),
    "ltc_u2": (
        RecurrentPPO,
        RecurrentCellPolicy,
        {"cell": "ltc", "hidden_size": 64, "ode_unfolds": 2},
    ),
    "ltc_ncp_u2": (
        RecurrentPPO,
        RecurrentCellPolicy,
        {"cell": "ltc", "hidden_size": LTC_NCP, "ode_unfolds": 2},
    ),
    "mlp": (PPO, "MlpPolicy", {}),
}
BASELINE = "lstm_sb3"

# SAC: RL Zoo's sac Pendulum-v1 (learning rate 1e-3, SB3's defaults otherwise).
SAC_SETTINGS: dict[str, Any] = {"learning_rate": 1e-3, "buffer_size": 100_000}
SAC_HISTORY = 8
SAC_POLICIES: dict[str, dict[str, Any]] = {
    "sac_mlp": {},
    **{
        f"sac_{cell}_window": {
            "features_extractor_class": SequenceExtractor,
            "features_extractor_kwargs": {"cell": cell, "hidden_size": 64},
        }
        for cell in ("cfc", "lstm", "gru", "ltc")
    },
    # RecurrentSAC (agents/sac_rec_*.yaml): the state carried through the episode, sequences
    # of 32 after a burn-in of 8, 32 a batch, [64, 64] after each cell.
    **{
        f"sac_rec_{cell}": {
            "cell": cell,
            "hidden_size": 64,
            **({"backbone_units": 64} if cell == "cfc" else {}),
        }
        for cell in ("cfc", "lstm", "gru", "ltc")
    },
}
REC_SAC_SETTINGS: dict[str, Any] = {
    **SAC_SETTINGS,
    "batch_size": 32,
    "sequence_length": 32,
    "burn_in": 8,
}
SAC_BASELINE = "sac_mlp"


def sac_steps_per_second(name: str, steps: int, device: str, seed: int) -> float:
    """SAC env steps per second after the random warm-up (``learning_starts``)."""
    policy_kwargs = SAC_POLICIES[name]
    if name.startswith("sac_rec_"):
        env = make_vec_env(TASK, n_envs=1, seed=seed)
        model: SAC = RecurrentSAC(
            "MlpPolicy", env, seed=seed, device=device, policy_kwargs=policy_kwargs,
            **REC_SAC_SETTINGS,
        )  # fmt: skip
    else:
        env_kwargs = {"history": SAC_HISTORY} if policy_kwargs else {}
        env = make_vec_env(TASK, n_envs=1, seed=seed, env_kwargs=env_kwargs)
        policy = "MultiInputPolicy" if policy_kwargs else "MlpPolicy"
        model = SAC(
            policy, env, seed=seed, device=device, policy_kwargs=policy_kwargs, **SAC_SETTINGS
        )
    model.learn(model.learning_starts)
    start = time.perf_counter()
    model.learn(steps, reset_num_timesteps=False)
    elapsed = time.perf_counter() - start
    env.close()
    return steps / elapsed


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
    parser.add_argument("--algo", choices=("recurrent_ppo", "sac"), default="recurrent_ppo")
    parser.add_argument(
        "--policies",
        nargs="+",
        choices=[*POLICIES, *SAC_POLICIES],
        default=None,
        help="default: cfc mlp (recurrent_ppo), sac_cfc_window (sac)",
    )
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median)")
    parser.add_argument("--steps", type=int, default=4096, help="env steps per measurement")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="default results/ppo_throughput_<device>.md (sac: sac_throughput_<device>.md)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    sac = args.algo == "sac"
    known = SAC_POLICIES if sac else POLICIES
    policies = args.policies or (["sac_cfc_window"] if sac else ["cfc", "mlp"])
    wrong = [name for name in policies if name not in known]
    if wrong:
        parser.error(f"--policies {' '.join(wrong)}: not {args.algo} policies; choose from "
                     f"{', '.join(known)}")  # fmt: skip
    baseline_name = SAC_BASELINE if sac else BASELINE
    names = [baseline_name, *[name for name in policies if name != baseline_name]]
    measure = sac_steps_per_second if sac else steps_per_second

    rates: dict[str, list[float]] = {name: [] for name in names}
    started = time.perf_counter()
    for round_index in range(args.rounds):
        order = names[round_index % len(names) :] + names[: round_index % len(names)]
        for name in order:
            rate = measure(name, args.steps, args.device, args.seed)
            rates[name].append(rate)
            print(f"round {round_index + 1}: {name:<9} {rate:7.1f} steps/s", flush=True)
    elapsed = time.perf_counter() - started

    baseline = statistics.median(rates[baseline_name])
    rows = [
        f"| policy | env steps/s (median) | ratio to {_label(baseline_name)} |",
        "|---|---|---|",
    ]
    for name in names:
        median = statistics.median(rates[name])
        rows.append(f"| {_label(name)} | {median:.1f} | {median / baseline:.2f}x |")
    command = shlex.join(["python", "scripts/bench_ppo_throughput.py", *(argv or sys.argv[1:])])
    settings = (
        f"RL Zoo sac Pendulum-v1 ({SAC_SETTINGS}), one env, windows of {SAC_HISTORY} frames, "
        f"hidden 64; RecurrentSAC: {REC_SAC_SETTINGS}, [64, 64] after each cell, CfC with a "
        "64-unit backbone; after the random warm-up steps"
        if sac
        else f"RL Zoo ppo_lstm PendulumNoVel ({N_ENVS} envs, {SETTINGS}), hidden 64, "
        "CfC with its default 128-unit backbone"
    )
    report = "\n".join(
        [
            f"# {'SAC' if sac else 'RecurrentPPO'} training throughput on {TASK} ({args.device})",
            "",
            f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
            f"- torch {torch.__version__}, Python {platform.python_version()}",
            f"- device: {args.device}, {machine_description(args.device)}; threads: {args.threads}",
            f"- settings: {settings}",
            f"- {args.rounds} interleaved rounds of {args.steps} env steps each; took "
            f"{elapsed:.0f} s; reproduce with: `{command}`",
            "",
            *rows,
        ]
    )
    print("\n" + report)
    out = args.out or Path("results") / f"{'sac' if sac else 'ppo'}_throughput_{args.device}.md"
    atomic_write_text(out, report + "\n")
    print(f"wrote {out}")


def _label(name: str) -> str:
    fixed = {
        "lstm_sb3": "sb3-contrib MlpLstmPolicy",
        "mlp": "PPO MlpPolicy (no memory)",
        "sac_mlp": "SAC MlpPolicy (no memory)",
    }
    if name in fixed:
        return fixed[name]
    if name.startswith("sac_rec_"):
        return f"RecurrentSAC({name.split('_')[2]}, sequences of 32 after 8 burn-in)"
    if name.startswith("sac_"):
        return f"SAC + SequenceExtractor({name.split('_')[1]}, 8 frames)"
    if name.startswith("ltc_"):
        extra = POLICIES[name][2]
        wiring = "AutoNCP(64, 16)" if isinstance(extra["hidden_size"], dict) else "dense 64"
        return f"RecurrentCellPolicy(ltc, {wiring}, {extra.get('ode_unfolds', 6)} unfolds)"
    return f"RecurrentCellPolicy({name})"
