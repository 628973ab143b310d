"""The ``cfc-rl`` command: ``cfc-rl {train,evaluate,export,compare,tune,...}``.

One argparse subcommand per step, each a thin layer over one function of
:mod:`cfc_rl.experiment`; ``scripts/train.py``, ``scripts/evaluate.py`` and
``scripts/compare.py`` call the same commands. Heavy imports (torch, SB3) happen inside the
commands, so that ``cfc-rl --help`` answers at once. Errors a user can fix (a bad file, a
damaged run, a failed build) are one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from cfc_rl.experiment.arguments import positive_int, seed_int

__all__ = ["compare_main", "evaluate_main", "main", "train_main"]

DEVICES = ("auto", "cpu", "cuda")


def setting(text: str) -> tuple[list[str], Any]:
    """An argparse type: ``--set key.sub=value`` (an agent-file key; the value as JSON, else
    as YAML: ``3e-4``, ``true``, ``[64, 64]``, ``lin_0.001``, ``{pi: [], vf: [64]}``)."""
    key, sep, raw = text.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. n_envs=8), got {text!r}")
    try:
        value = json.loads(raw)
    except ValueError:
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            raise argparse.ArgumentTypeError(f"cannot read the value of {text!r}") from None
    return key.split("."), value


def _number(text: str) -> int | float:
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def condition(text: str) -> tuple[str, Any]:
    """An argparse type: ``--set noise=0.1`` / ``--set irregular=2,4`` / ``--set period=3``
    for evaluate: a condition and its value (a number, or numbers separated by commas)."""
    key, sep, raw = text.partition("=")
    if not sep or not key or not raw:
        raise argparse.ArgumentTypeError(f"expected CONDITION=VALUE (e.g. noise=0.1), got {text!r}")
    values = [_number(part) for part in raw.split(",")]
    return key, values if len(values) > 1 else values[0]


def sweep_levels(text: str) -> tuple[str, list[int | float]]:
    """An argparse type: ``--sweep noise=0,0.05,0.1``: a condition and its levels."""
    key, sep, raw = text.partition("=")
    if not sep or not key or not raw:
        raise argparse.ArgumentTypeError(f"expected CONDITION=L1,L2,... got {text!r}")
    return key, [_number(part) for part in raw.split(",")]


def nest(settings: Sequence[tuple[list[str], Any]]) -> dict[str, Any]:
    """``[(["hyperparams", "gamma"], 0.9), (["n_envs"], 8)]`` as agent-file data."""
    data: dict[str, Any] = {}
    for path, value in settings:
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise argparse.ArgumentTypeError(f"--set {'.'.join(path)}: {part} is a value")
        node[path[-1]] = value
    return data


def _add_train(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--agent", help="agent file, e.g. agents/ppo_cfc.yaml")
    parser.add_argument("--task", help="task file, e.g. envs/cartpole_p.yaml, or a task id")
    parser.add_argument("--seed", type=seed_int, default=0, help="seed (default 0)")
    parser.add_argument(
        "--steps",
        type=positive_int,
        default=None,
        help="budget in environment steps (default: the task file's train.total_timesteps)",
    )
    parser.add_argument(
        "--set",
        dest="settings",
        type=setting,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="change an agent-file setting for this run, validated like the file, e.g. "
        "--set hyperparams.learning_rate=3e-4 --set n_envs=8 (repeatable)",
    )
    parser.add_argument("--device", default="auto", choices=DEVICES)
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
        type=positive_int,
        default=1,
        help="torch threads (default 1: small recurrent policies run fastest on one)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument(
        "--evaluate",
        action="store_true",
        help="evaluate the final model afterwards and print the result (as `cfc-rl evaluate`)",
    )


def _train(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if not args.run_dir and not (args.agent and args.task):
        parser.error("give --agent and --task (or --run-dir with --resume)")
    import torch

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
            overrides=nest(args.settings),
        )
    except TrainingInterrupted as e:
        print(f"\n{e}", file=sys.stderr)
        return 130
    result = run.read_result()
    print(
        f"{run.root}: final return {result['final_mean_return']:.1f} ± "
        f"{result['final_std_return']:.1f} ({result['eval_episodes']} episodes) after "
        f"{result['num_timesteps']} steps, {result['wall_clock_s']:.0f} s"
    )
    if args.evaluate:
        return main(["evaluate", str(run.root), "--device", args.device])
    print(f"evaluate it with: cfc-rl evaluate {run.root}")
    return 0


def _add_evaluate(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a run folder written by cfc-rl train")
    parser.add_argument(
        "--model",
        default="final",
        help="final (default), best (the best periodic evaluation's) or a checkpoint's path",
    )
    parser.add_argument(
        "--episodes", type=positive_int, default=None, help="default: the task file's"
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--deterministic",
        dest="deterministic",
        action="store_true",
        default=None,
        help="take the policy's mode (default: the task file's eval.deterministic)",
    )
    mode.add_argument("--stochastic", dest="deterministic", action="store_false", default=None)
    parser.add_argument(
        "--seed",
        type=seed_int,
        default=None,
        help="seed of the evaluation environments (default: the one of the run's own final "
        "evaluation, which this then reproduces)",
    )
    parser.add_argument("--device", default="auto", choices=DEVICES)
    parser.add_argument(
        "--set",
        dest="conditions",
        type=condition,
        action="append",
        default=[],
        metavar="CONDITION=VALUE",
        help="evaluate under a changed condition of the task: noise, dropout, flicker, "
        "irregular=MIN,MAX or period=K (each action held for K base steps); repeatable",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    parser.add_argument(
        "--video",
        action="store_true",
        help="record the first episode to RUN_DIR/video.mp4 (MuJoCo: MUJOCO_GL=egl or osmesa)",
    )


def _evaluate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.video and "MUJOCO_GL" not in os.environ and not os.environ.get("DISPLAY"):
        # No display: MuJoCo can only render offscreen; EGL is the common headless option.
        os.environ["MUJOCO_GL"] = "egl"
    if args.json:
        logging.getLogger("cfc_rl").setLevel(logging.WARNING)
    from cfc_rl.experiment.evaluate import EVALUATE_CSV, VideoUnavailable, evaluate_run

    try:
        result = evaluate_run(
            args.run_dir,
            model=args.model,
            conditions=dict(args.conditions),
            episodes=args.episodes,
            deterministic=args.deterministic,
            seed=args.seed,
            device=args.device,
            video=args.video,
            episodes_csv=Path(args.run_dir) / EVALUATE_CSV,
        )
    except VideoUnavailable as e:
        print(f"error: --video: {e}", file=sys.stderr)
        return 3
    if args.json:
        print(json.dumps(result))
        return 0
    changed = ", ".join(f"{k}={v}" for k, v in dict(args.conditions).items())
    print(
        f"{result['run']}: return {result['mean_return']:.1f} ± {result['std_return']:.1f}, "
        f"length {result['mean_length']:.1f} over {result['episodes']} episodes "
        f"({'deterministic' if result['deterministic'] else 'stochastic'}"
        f"{', ' + changed if changed else ''})"
    )
    if "video" in result:
        print(f"video: {result['video']}")
    return 0


def _add_compare(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--agents", nargs="+", required=True, help="agent files")
    parser.add_argument("--tasks", nargs="+", required=True, help="task files")
    parser.add_argument("--seeds", type=positive_int, default=3, help="seeds 0..N-1 (default 3)")
    parser.add_argument(
        "-j", "--jobs", type=positive_int, default=1, help="runs at once (default 1)"
    )
    parser.add_argument("--steps", type=positive_int, default=None, help="budget of every run")
    parser.add_argument("--out", default="runs/compare", help="output folder")
    parser.add_argument("--device", default="cpu", choices=DEVICES)
    from cfc_rl.experiment.ray_executor import add_executor_arguments

    add_executor_arguments(parser)


def _show(result) -> None:
    """One line per finished run (and its traceback if it failed)."""
    print(f"{result.status:8s} {result.seconds:7.1f} s  {result.job.run_dir}", flush=True)
    if result.error:
        print(result.error, file=sys.stderr)


def _interrupted(error: KeyboardInterrupt, args: argparse.Namespace) -> int:
    """Ctrl-C: what finished is kept (runs in training saved checkpoints); the same command
    goes on."""
    what = str(error) or "interrupted"
    print(f"\n{what}; continue with: {shlex.join(['cfc-rl', *args.argv])}", file=sys.stderr)
    return 130


def _exit_code(results) -> int:
    failed = [r for r in results if r.status == "failed"]
    if failed:
        print(
            f"{len(failed)} run(s) failed; run the same command again to retry them",
            file=sys.stderr,
        )
        return 1
    return 0


def _compare(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from cfc_rl.experiment.compare import compare, summary_markdown
    from cfc_rl.experiment.ray_executor import executor_from_args

    try:
        results, rows = compare(
            args.agents,
            args.tasks,
            seeds=args.seeds,
            steps=args.steps,
            out=args.out,
            device=args.device,
            executor=executor_from_args(args),
            on_result=_show,
        )
    except KeyboardInterrupt as e:
        return _interrupted(e, args)
    print()
    print(summary_markdown(rows))
    tasks = sorted({row["task"] for row in rows})
    plots = [
        f"curves_{task}.png" for task in tasks if (Path(args.out) / f"curves_{task}.png").exists()
    ]
    curves = ", ".join(plots)
    print(f"written: {args.out}/summary.csv, summary.md{', ' + curves if curves else ''}")
    return _exit_code(results)


def _add_benchmark(parser: argparse.ArgumentParser) -> None:
    from cfc_rl.experiment.ray_executor import add_executor_arguments

    grid = argparse.ArgumentParser(add_help=False)
    grid.add_argument(
        "--grid",
        default="results/benchmark/grid.yaml",
        help="the grid file (default results/benchmark/grid.yaml)",
    )
    chosen = argparse.ArgumentParser(add_help=False, parents=[grid])
    chosen.add_argument("--tiers", nargs="+", help="only these tiers")
    chosen.add_argument("--tasks", nargs="+", help="only these tasks (task file names)")
    chosen.add_argument("--agents", nargs="+", help="only these agents (agent file names)")
    chosen.add_argument("--device", default="cpu", choices=DEVICES)
    steps = parser.add_subparsers(dest="benchmark_command", required=True, metavar="STEP")
    run = steps.add_parser(
        "run",
        parents=[chosen],
        help="train the grid's runs that are not complete, then write the report",
        description="Train the grid's runs that are not complete (all of them, or the tiers, "
        "tasks, agents and seeds chosen), then write the report.",
    )
    run.add_argument("--seeds", nargs="+", type=seed_int, help="only these seeds")
    run.add_argument("-j", "--jobs", type=positive_int, default=1, help="runs at once (default 1)")
    run.add_argument(
        "--dry-run", action="store_true", help="list the runs it would train, and stop"
    )
    run.add_argument(
        "--tune",
        action="store_true",
        help="first search the chosen agents that have no search yet (as `benchmark tune`); "
        "without it their runs wait",
    )
    add_executor_arguments(run)
    tune = steps.add_parser(
        "tune",
        parents=[chosen],
        help="tune the grid's agents that have no search yet, with its equal budget",
        description="Search each chosen agent's settings on each chosen task with the grid's "
        "tuning budget (trials, seeds: the tier's where it sets its own; the agent's space), "
        "on seeds from 1000, and write the "
        "chosen values into the agent file as overrides.<task>. Searched cells are skipped; a "
        "search begun and not finished goes on, keeping its finished trials.",
    )
    add_executor_arguments(tune)
    report = steps.add_parser(
        "report",
        parents=[grid],
        help="aggregate the grid's complete runs into tables and plots",
        description="Aggregate the grid's complete runs into README.md, the CSV tables and the "
        "plots.",
    )
    report.add_argument("--out", help="folder of the report (default: the grid's folder)")


def _benchmark(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from cfc_rl.experiment.benchmark import (
        load_grid,
        plan,
        report,
        run_benchmark,
        select,
        tune_cells,
        untuned,
    )

    grid = load_grid(args.grid)
    if args.benchmark_command == "report":
        report(grid, args.out)
        _show_report(grid, args.out)
        return 0
    from cfc_rl.experiment.ray_executor import executor_from_args, executor_options

    cells = select(grid, tiers=args.tiers, tasks=args.tasks, agents=args.agents)
    chosen = dict(tiers=args.tiers, tasks=args.tasks, agents=args.agents, device=args.device)
    if args.benchmark_command == "tune" or (args.tune and not args.dry_run):
        if args.benchmark_command == "run":
            plan(grid, seeds=args.seeds, **chosen)  # its errors before a search starts
        try:
            tune_cells(
                grid,
                cells,
                on_done=lambda task, agent, what: print(f"{task}/{agent}: {what}", flush=True),
                device=args.device,
                **executor_options(args),
            )
        except KeyboardInterrupt as e:
            return _interrupted(e, args)
        if args.benchmark_command == "tune":
            return 0
    args.out = str(grid.runs)  # with --storage, the run folders must lie inside it
    jobs = plan(grid, seeds=args.seeds, **chosen)  # the agent files as the searches left them
    waiting = untuned(grid, cells)
    held = [j for j in jobs if _cell(j)[:2] in waiting]
    jobs = [j for j in jobs if _cell(j)[:2] not in waiting]
    if waiting:
        by_task: dict[str, list[str]] = {}
        for task, agent in sorted(waiting):
            by_task.setdefault(task, []).append(agent)
        how = "cfc-rl benchmark tune" if args.tune else "run with --tune, or cfc-rl benchmark tune"
        print(f"runs waiting for their agent's search ({how}):")
        for task, agents in by_task.items():
            print(f"  {task}: {', '.join(agents)}")
    if args.dry_run:
        _dry_run(grid, cells, jobs, held, waiting)
        return 0

    try:
        results = run_benchmark(grid, jobs, executor_from_args(args), on_result=_show)
    except KeyboardInterrupt as e:
        return _interrupted(e, args)
    _show_report(grid, None)
    return _exit_code(results)


def _dry_run(grid: Any, cells: list, jobs: list, held: list, waiting: set[tuple[str, str]]) -> None:
    """The runs to train, then what they, the runs waiting for a search and the missing
    searches would cost at the speeds the committed runs measured (one core per run)."""
    from cfc_rl.experiment.benchmark import estimate_seconds, measured_speeds
    from cfc_rl.experiment.jobs import stale_runs
    from cfc_rl.experiment.tune import SEARCH_STATE

    speeds = measured_speeds(grid)
    todo = [job for job in jobs if not job.is_complete()]
    for job in todo:
        seconds, _ = estimate_seconds([_cell(job)], speeds)
        guess = f"~{seconds / 60:5.0f} min" if seconds else "    ? min"
        print(f"{job.budget:>9,} steps  {guess}  {job.run_dir}")
    for line in stale_runs(jobs):
        print(f"stale: {line}")

    def cost(runs: list[tuple[str, str, int]]) -> str:
        seconds, unknown = estimate_seconds(runs, speeds)
        agents = sorted({a for _, a, _ in unknown if (None, a) not in speeds})
        tasks = sorted({t for t, a, _ in unknown if (None, a) in speeds})
        why = [
            f"of {', '.join(agents)}" if agents else "",
            f"on {', '.join(tasks)}" if tasks else "",
        ]
        about = f"about {seconds / 3600:.1f} CPU-hours at the committed runs' speeds"
        if not unknown:
            return about
        reason = f"no run yet {'; none yet '.join(filter(None, why))}"
        if len(unknown) == len(runs):
            return f"no estimate ({reason})"
        return f"{about} ({len(unknown)} not counted: {reason})"

    print(f"{len(todo)} of {len(jobs)} runs to train: {cost([_cell(j) for j in todo])}")
    if waiting and grid.tuning is not None:
        print(f"{len(held)} runs waiting for a search: {cost([_cell(j) for j in held])}")
        # a search trains at most (trial 0 + trials) x seeds runs of the budget (ASHA stops
        # some early); one made before searches began with trial 0 needs only trial 0
        searches, only_trial_0, budgets = [], 0, {}
        for tier, t, a in cells:
            if (t.name, Path(a).stem) not in waiting:
                continue
            tuning = grid.tuning_for(tier)
            budgets[tier.name] = tuning.describe()
            older = (grid.searches / t.name / Path(a).stem / "trials.csv").exists()
            only_trial_0 += older
            trials = 1 if older else tuning.trials + 1
            searches.append(
                (t.name, Path(a).stem, t.steps_for(Path(a).stem) * trials * tuning.seeds)
            )
        each = (
            next(iter(budgets.values()))
            if len(set(budgets.values())) == 1
            else "per tier, "
            + "; ".join(f"{t.name}: {budgets[t.name]}" for t in grid.tiers if t.name in budgets)
        )
        older = f"; {only_trial_0} made before trial 0 existed need only it" if only_trial_0 else ""
        print(f"{len(searches)} searches missing ({each}{older}): at most {cost(searches)}")
        begun = [
            f"{task}/{agent}"
            for task, agent, _ in searches
            if (grid.searches / task / agent / SEARCH_STATE).exists()
        ]
        if begun:
            keep = "run again, they keep their finished trials"
            print(f"searches begun, not finished ({keep}): {', '.join(begun)}")


def _cell(job: Any) -> tuple[str, str, int]:
    return job.task["name"], job.agent["name"], job.budget


def _show_report(grid: Any, out: str | None) -> None:
    folder = Path(out) if out else grid.path.parent
    spliced = grid.headline_in and folder.resolve() == grid.path.parent.resolve()
    also = f", {grid.headline_in} (headline)" if spliced else ""
    print(f"written: {folder}/README.md{also}")


def _add_export(parser: argparse.ArgumentParser) -> None:
    from cfc_rl.experiment.export import add_export_arguments

    add_export_arguments(parser)


def _export(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from cfc_rl.experiment.export import export_command

    return export_command(args, parser)


def _add_tune(parser: argparse.ArgumentParser) -> None:
    from cfc_rl.experiment.tune import add_tune_arguments

    add_tune_arguments(parser)


def _tune(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from cfc_rl.experiment.tune import tune_command

    try:
        return tune_command(args, parser)
    except KeyboardInterrupt as e:
        return _interrupted(e, args)


def _add_robustness(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", help="run folders (seeds of one or more agents)")
    parser.add_argument(
        "--sweep",
        type=sweep_levels,
        action="append",
        required=True,
        metavar="CONDITION=L1,L2,...",
        help="levels of a condition: noise, dropout, flicker or period (repeatable)",
    )
    parser.add_argument("--episodes", type=positive_int, default=None)
    parser.add_argument("--device", default="auto", choices=DEVICES)
    parser.add_argument("--out", default="runs/robustness", help="folder of the table and plots")


def _robustness(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from cfc_rl.experiment.robustness import sweep, sweep_markdown

    conditions = [name for name, _ in args.sweep]
    twice = next((name for i, name in enumerate(conditions) if name in conditions[:i]), None)
    if twice is not None:
        parser.error(f"--sweep {twice} is given twice: give all its levels at once")

    def show(row: dict[str, Any]) -> None:
        level = f"{row['condition']}={row['level']}"
        print(f"{level:14s} {row['mean_return']:9.1f}  {row['run']}", flush=True)

    rows = sweep(
        args.runs,
        dict(args.sweep),
        out=args.out,
        episodes=args.episodes,
        device=args.device,
        on_result=show,
    )
    print()
    print(sweep_markdown(rows))
    plots = ", ".join(f"robustness_{name}.png" for name in dict(args.sweep))
    print(f"written: {args.out}/robustness.csv, robustness.md, robustness_runs.csv, {plots}")
    return 0


def _add_list(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--agents", default="agents", help="folder of agent files (agents)")
    parser.add_argument("--tasks", default="envs", help="folder of task files (envs)")


def _list(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from cfc_rl.envs import TASKS
    from cfc_rl.experiment.settings import load_agent_config
    from cfc_rl.experiment.tasks import load_task

    print("task ids (cfc_rl.envs; P: positions only, V: velocities only):")
    for task_id, spec in TASKS.items():
        print(f"  {task_id:40s} {spec.base_id} (observation: {len(spec.indices)} values)")
    print(f"\ntask files ({args.tasks}/):")
    for path in sorted(Path(args.tasks).glob("*.yaml")):
        task = load_task(path)
        print(f"  {path!s:40s} {task.id}, {task.train.total_timesteps:,} steps")
    print(f"\nagent files ({args.agents}/):")
    for path in sorted(Path(args.agents).glob("*.yaml")):
        agent = load_agent_config(path)
        cells = f", cell {', '.join(agent.cells)}" if agent.cells else ""
        print(f"  {path!s:40s} {agent.algo}, {agent.policy}{cells}")
    return 0


def _add_bench(parser: argparse.ArgumentParser) -> None:
    """None here: the benchmark's own parser reads every option, --help included."""


def _bench(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from cfc_rl.experiment.bench import main as bench

    bench(args.extra)
    return 0


def _add_build(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "extensions",
        nargs="*",
        help="the extensions to build (default: all of them)",
    )


def _build(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from cfc_rl.nn import cpu_extensions

    unknown = sorted(set(args.extensions) - set(cpu_extensions.EXTENSIONS))
    if unknown:
        parser.error(
            f"unknown extension(s) {', '.join(unknown)}; known: "
            f"{', '.join(cpu_extensions.EXTENSIONS)}"
        )
    names = tuple(args.extensions) or cpu_extensions.EXTENSIONS
    for report in cpu_extensions.build_all(names):
        how = f"built in {report.seconds:.0f} s" if report.built else "already built"
        print(f"{report.name}: {how}: {report.path}")
    return 0


# name -> (help, add arguments, run)
COMMANDS: dict[
    str,
    tuple[
        str,
        Callable[[argparse.ArgumentParser], None],
        Callable[[argparse.Namespace, argparse.ArgumentParser], int],
    ],
] = {
    "train": ("train an agent on a task", _add_train, _train),
    "evaluate": ("evaluate a trained run", _add_evaluate, _evaluate),
    "compare": ("train agents x tasks x seeds and summarise them", _add_compare, _compare),
    "benchmark": (
        "the benchmark study: train its grid's missing runs, aggregate the committed ones",
        _add_benchmark,
        _benchmark,
    ),
    "export": (
        "export a trained policy (with its state) to ONNX or TorchScript",
        _add_export,
        _export,
    ),
    "tune": (
        "search hyperparameters with Ray Tune (Optuna TPE + ASHA); the same command resumes a "
        "stopped search",
        _add_tune,
        _tune,
    ),
    "robustness": (
        "evaluate runs as a condition (noise, control period...) moves away from training",
        _add_robustness,
        _robustness,
    ),
    "list": ("the task ids, task files and agent files", _add_list, _list),
    "bench": ("speed of the cells against torch.nn.LSTM", _add_bench, _bench),
    "build": ("compile the C++ loops of the cells for this machine", _add_build, _build),
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cfc-rl",
        description="Train, evaluate and compare recurrent RL policies (CfC, LTC, LSTM, ...).",
    )
    parser.add_argument("--version", action="version", version=f"cfc-rl {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, add_arguments, run) in COMMANDS.items():
        # bench passes everything, --help included, to the benchmark's own parser
        sub = commands.add_parser(
            name, help=help_text, description=help_text, add_help=name != "bench"
        )
        add_arguments(sub)
        sub.set_defaults(run=run, parser=sub)
    return parser


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("cfc-rl")
    except metadata.PackageNotFoundError:
        return "(not installed)"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``cfc-rl``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    args.argv = argv
    if extra and args.command != "bench":
        args.parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra = extra
    _setup_logging()
    from cfc_rl.envs import ConfigError
    from cfc_rl.experiment.runs import RunError
    from cfc_rl.nn.cpu_extensions import ExtensionBuildError

    try:
        return args.run(args, args.parser)
    except (ConfigError, RunError, FileExistsError, FileNotFoundError, ExtensionBuildError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def train_main(argv: Sequence[str] | None = None) -> int:
    """``cfc-rl train`` (``scripts/train.py``)."""
    return main(["train", *(sys.argv[1:] if argv is None else argv)])


def evaluate_main(argv: Sequence[str] | None = None) -> int:
    """``cfc-rl evaluate`` (``scripts/evaluate.py``)."""
    return main(["evaluate", *(sys.argv[1:] if argv is None else argv)])


def compare_main(argv: Sequence[str] | None = None) -> int:
    """``cfc-rl compare`` (``scripts/compare.py``)."""
    return main(["compare", *(sys.argv[1:] if argv is None else argv)])


def _setup_logging(level: int = logging.INFO) -> None:
    # Our messages at ``level``; other libraries' (rliable logs every bootstrap) only warnings.
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("cfc_rl").setLevel(level)


if __name__ == "__main__":
    sys.exit(main())
