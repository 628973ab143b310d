"""The ``cfc-rl`` command: ``cfc-rl {train,evaluate,compare,bench} ...``.

Each subcommand is a thin layer over one function of :mod:`cfc_rl.experiment`;
``scripts/train.py``, ``scripts/evaluate.py`` and ``scripts/compare.py`` call the same
``*_main`` functions. Heavy imports (torch, SB3) happen inside the subcommands, so that
``cfc-rl --help`` answers at once.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence

from cfc_rl.experiment.runs import RunError

__all__ = ["compare_main", "evaluate_main", "main", "train_main"]


def _train_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--agent", help="agent file, e.g. agents/ppo_cfc.yaml")
    parser.add_argument("--task", help="task file, e.g. envs/cartpole_p.yaml, or a task id")
    parser.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="budget in environment steps (default: the task file's train.total_timesteps)",
    )
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument(
        "--out", default="runs", help="root of the run folders: OUT/<task>/<agent>/seed_<n>"
    )
    parser.add_argument("--run-dir", default=None, help="the run folder itself (instead of --out)")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in the run folder from its latest checkpoint to its budget",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: small recurrent policies run fastest on one)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument(
        "--evaluate",
        action="store_true",
        help="evaluate the final model afterwards and print the result (as `cfc-rl evaluate`)",
    )
    return parser


def train_main(argv: Sequence[str] | None = None) -> int:
    """``cfc-rl train``: train one agent on one task; prints the run folder."""
    parser = _train_parser(
        argparse.ArgumentParser(prog="cfc-rl train", description=train_main.__doc__)
    )
    args = parser.parse_args(argv)
    if not args.run_dir and not (args.agent and args.task):
        parser.error("give --agent and --task (or --run-dir with --resume)")
    _setup_logging()
    import torch

    from cfc_rl.envs import ConfigError
    from cfc_rl.experiment.train import TrainingInterrupted, train

    torch.set_num_threads(args.threads)
    try:
        run = train(
            args.agent,
            args.task,
            seed=args.seed,
            steps=args.steps,
            device=args.device,
            out=args.out,
            run_dir=args.run_dir,
            resume=args.resume,
            progress_bar=not args.no_progress,
        )
    except TrainingInterrupted as e:
        print(f"\n{e}", file=sys.stderr)
        return 130
    except (ConfigError, RunError, FileExistsError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result = run.read_result()
    print(
        f"{run.root}: final return {result['final_mean_return']:.1f} ± "
        f"{result['final_std_return']:.1f} ({result['eval_episodes']} episodes) after "
        f"{result['num_timesteps']} steps, {result['wall_clock_s']:.0f} s"
    )
    if args.evaluate:
        return evaluate_main([str(run.root), "--device", args.device])
    print(f"evaluate it with: cfc-rl evaluate {run.root}")
    return 0


def evaluate_main(argv: Sequence[str] | None = None) -> int:
    """``cfc-rl evaluate``: run episodes with a trained run's final model."""
    parser = argparse.ArgumentParser(prog="cfc-rl evaluate", description=evaluate_main.__doc__)
    parser.add_argument("run_dir", help="a run folder written by cfc-rl train")
    parser.add_argument("--episodes", type=int, default=None, help="default: the task file's")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--deterministic",
        dest="deterministic",
        action="store_true",
        default=None,
        help="take the policy's mode (default: the task file's eval.deterministic)",
    )
    mode.add_argument("--stochastic", dest="deterministic", action="store_false", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    parser.add_argument(
        "--video",
        action="store_true",
        help="record the first episode to RUN_DIR/video.mp4 (MuJoCo: MUJOCO_GL=egl or osmesa)",
    )
    args = parser.parse_args(argv)
    if args.video and "MUJOCO_GL" not in os.environ and not os.environ.get("DISPLAY"):
        # No display: MuJoCo can only render offscreen; EGL is the common headless option.
        os.environ["MUJOCO_GL"] = "egl"
    _setup_logging(logging.WARNING if args.json else logging.INFO)
    from cfc_rl.experiment.evaluate import VideoUnavailable, evaluate_run

    try:
        result = evaluate_run(
            args.run_dir,
            episodes=args.episodes,
            deterministic=args.deterministic,
            seed=args.seed,
            device=args.device,
            video=args.video,
        )
    except VideoUnavailable as e:
        print(f"error: --video: {e}", file=sys.stderr)
        return 3
    except (RunError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"{result['run']}: return {result['mean_return']:.1f} ± {result['std_return']:.1f}, "
            f"length {result['mean_length']:.1f} over {result['episodes']} episodes "
            f"({'deterministic' if result['deterministic'] else 'stochastic'})"
        )
        if "video" in result:
            print(f"video: {result['video']}")
    return 0


def compare_main(argv: Sequence[str] | None = None) -> int:
    """``cfc-rl compare``: train a grid of agents × tasks × seeds and summarise it."""
    parser = argparse.ArgumentParser(prog="cfc-rl compare", description=compare_main.__doc__)
    parser.add_argument("--agents", nargs="+", required=True, help="agent files")
    parser.add_argument("--tasks", nargs="+", required=True, help="task files")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (default 3)")
    parser.add_argument("-j", "--jobs", type=int, default=1, help="runs at once (default 1)")
    parser.add_argument("--steps", type=int, default=None, help="budget of every run")
    parser.add_argument("--out", default="runs/compare", help="output folder")
    parser.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    args = parser.parse_args(argv)
    _setup_logging()
    from cfc_rl.envs import ConfigError
    from cfc_rl.experiment.compare import LocalExecutor, compare, summary_markdown

    def show(result) -> None:
        print(f"{result.status:8s} {result.seconds:7.1f} s  {result.job.run_dir}", flush=True)
        if result.error:
            print(result.error, file=sys.stderr)

    try:
        results, rows = compare(
            args.agents,
            args.tasks,
            seeds=args.seeds,
            steps=args.steps,
            out=args.out,
            device=args.device,
            executor=LocalExecutor(args.jobs),
            on_result=show,
        )
    except (ConfigError, RunError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print()
    print(summary_markdown(rows))
    print(f"written: {args.out}/summary.csv, summary.md, curves_<task>.png")
    failed = [r for r in results if r.status == "failed"]
    if failed:
        print(
            f"{len(failed)} run(s) failed; run the same command again to retry them",
            file=sys.stderr,
        )
        return 1
    return 0


def bench_main(argv: Sequence[str] | None = None) -> int:
    """``cfc-rl bench``: the cell benchmark (:mod:`cfc_rl.experiment.bench`)."""
    from cfc_rl.experiment.bench import main as bench

    bench(list(argv) if argv is not None else None)
    return 0


COMMANDS = {
    "train": train_main,
    "evaluate": evaluate_main,
    "compare": compare_main,
    "bench": bench_main,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``cfc-rl``: dispatch to a subcommand."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(
            "usage: cfc-rl {train,evaluate,compare,bench} ...\n\n"
            "  train     train an agent on a task:   cfc-rl train --agent agents/ppo_cfc.yaml "
            "--task envs/cartpole_p.yaml\n"
            "  evaluate  evaluate a run:             cfc-rl evaluate runs/cartpole_p/ppo_cfc/"
            "seed_0\n"
            "  compare   agents x tasks x seeds:     cfc-rl compare --agents A.yaml B.yaml "
            "--tasks T.yaml --seeds 3\n"
            "  bench     speed of the cells:         cfc-rl bench --quick\n\n"
            "cfc-rl COMMAND --help for the options of each.",
            file=sys.stdout if argv and argv[0] in ("-h", "--help") else sys.stderr,
        )
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    return COMMANDS[argv[0]](argv[1:])


def _setup_logging(level: int = logging.INFO) -> None:
    # Our messages at ``level``; other libraries' (rliable logs every bootstrap) only warnings.
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("cfc_rl").setLevel(level)


if __name__ == "__main__":
    sys.exit(main())
