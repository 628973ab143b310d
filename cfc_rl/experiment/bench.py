"""Speed of every recurrent cell, as a ratio to ``torch.nn.LSTM`` on the same shapes.

For each shape and each cell of :data:`cfc_rl.nn.CELLS` (built with ``make_cell(name, I, H)``
and its default settings, so CfC has the 128-unit backbone), plus the reference
``ncps.torch.CfC`` and ``ncps.torch.LTC`` when ncps is installed, this script times one
training call (zero the gradients, forward, ``y.sum().backward()``) or, for the rollout shape
S4, one forward call under ``torch.no_grad()``.

Why ratios: the machines this runs on are shared and noisy, so an absolute time measured today
says little about tomorrow. ``torch.nn.LSTM`` is timed in the same process, on the same inputs,
interleaved with the other candidates (every round times every candidate once, so a slow spell
hits all of them alike), and each figure is reported as ``median time / median LSTM time``.
The LSTM's absolute time per call is printed too, for reference.

Noise control: ``torch.set_num_threads`` (1 by default), warm-up calls, an inner loop long
enough for each timed block to last at least ``--min-block-ms``, the median over rounds, and
Python's garbage collector paused while a block runs. Slow candidates (the LTCs are ~100x an
LSTM) get fewer rounds (``--max-seconds`` per candidate and shape, at least 3), and candidates
whose backward pass would need more than ``--max-memory-gb`` are skipped with a note.

Usage::

    python scripts/bench_cells.py                      # full run, writes results/bench_cells_cpu.md
    python scripts/bench_cells.py --quick              # ~30 s smoke run, prints only
    python scripts/bench_cells.py --shapes S1 S4 --cells cfc ncps_cfc --repeats 30
    python scripts/bench_cells.py --device cuda        # writes results/bench_cells_cuda.md
"""

from __future__ import annotations

import argparse
import csv
import datetime
import gc
import importlib.metadata
import io
import math
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from cfc_rl.experiment.runs import atomic_write_text, machine_description
from cfc_rl.nn import CELLS, make_cell

try:
    import ncps.torch as ncps_torch
except ImportError:
    ncps_torch = None


@dataclass(frozen=True)
class Shape:
    """One benchmark setting: x has shape (batch, steps, inputs), the cells ``hidden`` units."""

    name: str
    batch: int
    steps: int
    inputs: int
    hidden: int
    backward: bool  # True: zero grads + forward + backward; False: forward under no_grad

    @property
    def label(self) -> str:
        mode = "fwd+bwd" if self.backward else "fwd no-grad"
        return f"{self.name} B{self.batch} T{self.steps} I{self.inputs} H{self.hidden} {mode}"


# PPO minibatches (S1, S3), a small task (S2) and
# one environment step of a rollout with 8 parallel environments (S4).
SHAPES: dict[str, Shape] = {
    shape.name: shape
    for shape in (
        Shape("S1", batch=64, steps=128, inputs=17, hidden=64, backward=True),
        Shape("S2", batch=8, steps=64, inputs=3, hidden=64, backward=True),
        Shape("S3", batch=256, steps=64, inputs=17, hidden=128, backward=True),
        Shape("S4", batch=8, steps=1, inputs=17, hidden=64, backward=False),
    )
}

BASELINE = "torch_lstm"
NCPS_CANDIDATES = ("ncps_cfc", "ncps_ltc")
# Cells beyond their default settings: an LTC wired as the LTC papers use it (a sparse NCP
# circuit of the same neurons, a quarter of them motor neurons).
VARIANTS: dict[str, Callable[[Shape], nn.Module]] = {
    "ltc_ncp": lambda shape: make_cell(
        "ltc",
        shape.inputs,
        {"wiring": "autoncp", "units": shape.hidden, "output_size": shape.hidden // 4},
    ),
}
LABELS = {
    BASELINE: "torch.nn.LSTM",
    "ncps_cfc": "ncps CfC",
    "ncps_ltc": "ncps LTC",
    "ltc_ncp": "ltc, AutoNCP(H, H/4)",
}

# Targets of the performance issue. cfc / LSTM: shape -> (target <=, ncps CfC / LSTM measured
# in the issue on a 2-core CPU, 1 thread, or None).
CFC_RATIO_TARGETS: dict[str, tuple[float, float | None]] = {
    "S1": (1.0, 5.0),
    "S2": (2.0, 13.8),
    "S3": (1.0, 0.98),
    "S4": (1.5, None),
}
# ltc / LSTM: shape -> target <= (the LTC speed issue; its machine: a 2-core AMD Zen 5).
LTC_RATIO_TARGETS: dict[str, float] = {"S1": 12.0, "S2": 20.0}
# Speed-ups of our cell over the ncps one (ncps time / our time): (ours, ncps) -> shape -> >=.
SPEEDUPS: dict[tuple[str, str], dict[str, float]] = {
    ("cfc", "ncps_cfc"): {"S1": 3.0, "S2": 3.0},
    ("ltc", "ncps_ltc"): {"S1": 3.0},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; ``--quick`` swaps in settings for a ~30 s smoke run."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    candidates = list(CELLS) + list(VARIANTS) + list(NCPS_CANDIDATES)
    parser.add_argument(
        "--cells",
        nargs="+",
        choices=candidates,
        default=candidates,
        help="cells of cfc_rl.nn.CELLS, variants (ltc_ncp) and the ncps references "
        "(torch.nn.LSTM is always timed)",
    )
    parser.add_argument("--repeats", type=int, default=21, help="timed rounds (median over them)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="Markdown table to write (a CSV of raw seconds goes next to it); default "
        "results/bench_cells_<device>.md, none with --quick",
    )
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=20.0,
        help="time budget of one candidate on one shape; slower candidates get fewer rounds",
    )
    parser.add_argument("--min-rounds", type=int, default=3, help="rounds even for slow ones")
    parser.add_argument("--min-block-ms", type=float, default=20.0, help="length of a timed block")
    parser.add_argument(
        "--max-memory-gb",
        type=float,
        default=8.0,
        help="skip a candidate whose backward pass is estimated to need more memory",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="after timing, profile each candidate (torch.profiler, CPU) and add a table of "
        "where its time goes: matrix multiplies against everything else",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--quick", action="store_true", help="~30 s smoke run: few short rounds, prints only"
    )
    args = parser.parse_args(argv)
    if args.quick:  # options left at their defaults take the smoke-run values
        quick = {"repeats": 3, "max_seconds": 1.0, "min_rounds": 1, "min_block_ms": 5.0}
        for key, value in quick.items():
            if getattr(args, key) == parser.get_default(key):
                setattr(args, key, value)
    if args.out is None and not args.quick:
        args.out = Path("results") / f"bench_cells_{args.device}.md"
    if args.profile and args.device != "cpu":
        parser.error("--profile reads CPU time; it runs with --device cpu only")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch.cuda.is_available() is False")
    if args.repeats < 1 or args.min_rounds < 1 or args.threads < 1:
        parser.error("--repeats, --min-rounds and --threads must be >= 1")
    return args


def build_module(name: str, shape: Shape) -> nn.Module:
    """A candidate by name, with its default settings."""
    if name == BASELINE:
        return nn.LSTM(shape.inputs, shape.hidden, batch_first=True)
    if name == "ncps_cfc":
        return ncps_torch.CfC(shape.inputs, shape.hidden)
    if name == "ncps_ltc":
        return ncps_torch.LTC(shape.inputs, shape.hidden)
    if name in VARIANTS:
        return VARIANTS[name](shape)
    return make_cell(name, shape.inputs, shape.hidden)


def make_call(module: nn.Module, x: torch.Tensor, backward: bool) -> Callable[[], None]:
    """One timed call: a training step's worth of work, or one rollout forward pass.

    Every candidate returns ``(y, state)`` (torch LSTM, ncps and ours alike), so ``[0]`` is y.
    """
    if backward:

        def call() -> None:
            module.zero_grad(set_to_none=True)
            module(x)[0].sum().backward()

    else:

        def call() -> None:
            with torch.no_grad():
                module(x)

    return call


def estimate_backward_gb(module: nn.Module, x: torch.Tensor) -> float:
    """Rough peak memory of forward + backward over all of x, in GiB.

    Counts the bytes autograd saves for backward on 2- and 3-step prefixes of x, extrapolates
    linearly to all steps and doubles it (gradients and temporaries: measured 1.7x for the LTCs).
    """

    def saved_bytes(steps: int) -> int:
        storages: dict[int, int] = {}

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            module(x[:, :steps])
        return sum(storages.values())

    steps = x.shape[1]
    if steps <= 3:
        total = saved_bytes(steps)
    else:
        two, three = saved_bytes(2), saved_bytes(3)
        total = two + (three - two) * (steps - 2)
    return 2 * total / 2**30


@contextmanager
def gc_paused() -> Iterator[None]:
    """Pause Python's garbage collector, as ``timeit`` does, so it does not fire mid-block."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@dataclass
class Candidate:
    """A module under test on one shape, and its timings (seconds per call, one per round)."""

    name: str
    call: Callable[[], None] | None = None
    calls_per_block: int = 1
    rounds: int = 0
    samples: list[float] = field(default_factory=list)
    note: str = ""  # why it has no figure (skipped, error)
    # --profile: (operator, self CPU seconds per call, calls per call), largest first
    profile: list[tuple[str, float, float]] = field(default_factory=list)

    @property
    def median(self) -> float | None:
        return statistics.median(self.samples) if self.samples else None


def time_block(call: Callable[[], None], calls: int, sync: Callable[[], None]) -> float:
    """Seconds per call over ``calls`` back-to-back calls."""
    with gc_paused():
        sync()
        start = time.perf_counter()
        for _ in range(calls):
            call()
        sync()
        return (time.perf_counter() - start) / calls


def prepare(
    name: str, shape: Shape, args: argparse.Namespace, sync: Callable[[], None]
) -> Candidate:
    """Build a candidate, check its memory, warm it up and size its blocks and rounds."""
    candidate = Candidate(name)
    try:
        torch.manual_seed(args.seed)
        module = build_module(name, shape).to(args.device)
        x = torch.randn(shape.batch, shape.steps, shape.inputs, device=args.device)
        if shape.backward:
            needed = estimate_backward_gb(module, x)
            if needed > args.max_memory_gb:
                candidate.note = f"skipped: needs ~{needed:.1f} GB (> --max-memory-gb)"
                return candidate
        call = make_call(module, x, shape.backward)
        seconds = time_block(call, 1, sync)  # warm-up: lazy initialisation, allocator
        calls = 1
        while seconds < 1.0:  # cheap enough to warm up more: grow the block until long enough
            seconds = time_block(call, calls, sync)
            if seconds * calls >= args.min_block_ms / 1000:
                break
            calls = max(2 * calls, math.ceil(1.2 * args.min_block_ms / 1000 / seconds))
    except Exception as error:  # report it in the table and go on with the others
        message = str(error).splitlines()[0] if str(error) else ""
        candidate.note = f"error: {type(error).__name__}: {message[:80]}"
        return candidate
    candidate.call = call
    candidate.calls_per_block = calls
    block = seconds * candidate.calls_per_block
    candidate.rounds = max(args.min_rounds, min(args.repeats, int(args.max_seconds / block)))
    return candidate


def bench_shape(
    shape: Shape, names: list[str], args: argparse.Namespace, sync: Callable[[], None]
) -> dict[str, Candidate]:
    """Time every candidate on one shape, round-robin, and return them by name."""
    candidates = {}
    for name in names:
        candidate = prepare(name, shape, args, sync)
        status = candidate.note or (
            f"{candidate.rounds} rounds x {candidate.calls_per_block} calls"
        )
        print(f"  {shape.name} {LABELS.get(name, name):>14}: {status}", flush=True)
        candidates[name] = candidate
    ready = [c for c in candidates.values() if c.call is not None]
    for round_index in range(max((c.rounds for c in ready), default=0)):
        shift = round_index % len(ready)  # rotate the order so no one always goes first
        for candidate in ready[shift:] + ready[:shift]:
            if round_index < candidate.rounds and not candidate.note:
                try:
                    seconds = time_block(candidate.call, candidate.calls_per_block, sync)
                except Exception as error:
                    candidate.note = f"error: {type(error).__name__}: {error}"[:100]
                    candidate.samples.clear()
                    continue
                candidate.samples.append(seconds)
    for candidate in ready:
        if args.profile and candidate.call is not None and not candidate.note:
            candidate.profile = profile_call(candidate.call, candidate.calls_per_block)
        candidate.call = None  # free the module and its inputs before the next shape
    return candidates


# Operators whose self time is matrix multiplication (the BLAS calls behind linear, matmul, @).
MATMUL_OPERATORS = frozenset({"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"})


def profile_call(call: Callable[[], None], calls: int) -> list[tuple[str, float, float]]:
    """Operators by self CPU time over ``calls`` calls: (name, seconds per call, occurrences per
    call), largest first. The custom autograd Functions' own rows hold the work of compiled
    loops that is not an ATen operator (their fused elementwise passes)."""
    from torch.profiler import ProfilerActivity, profile

    with gc_paused(), profile(activities=[ProfilerActivity.CPU]) as profiler:
        for _ in range(calls):
            call()
    rows = [
        (event.key, event.self_cpu_time_total / 1e6 / calls, event.count / calls)
        for event in profiler.key_averages()
    ]
    return sorted(rows, key=lambda row: row[1], reverse=True)


def profile_tables(results: dict[str, dict[str, Candidate]], shapes: list[Shape]) -> str:
    """Where each candidate's time goes (from --profile), one table per shape."""
    text = (
        "## Where the time goes (--profile)\n\n"
        "Self CPU time per call under torch.profiler, which adds about a microsecond to every "
        "operator: matrix multiplies (aten::mm, addmm, bmm, baddbmm) against everything else, "
        "and the largest other rows. The LSTM column reads: matrix multiplies alone take this "
        "fraction of torch.nn.LSTM's whole call, timed without the profiler.\n"
    )
    for shape in shapes:
        lstm = results[shape.name][BASELINE].median
        rows = []
        for candidate in results[shape.name].values():
            if not candidate.profile:
                continue
            total = sum(seconds for _, seconds, _ in candidate.profile)
            matmul = sum(s for name, s, _ in candidate.profile if name in MATMUL_OPERATORS)
            count = sum(n for name, _, n in candidate.profile if name in MATMUL_OPERATORS)
            others = [row for row in candidate.profile if row[0] not in MATMUL_OPERATORS][:4]
            rows.append(
                [
                    LABELS.get(candidate.name, candidate.name),
                    f"{1000 * total:.2f} ms",
                    f"{1000 * matmul:.2f} ms ({count:.0f} calls)",
                    "-" if lstm is None else f"{matmul / lstm:.2f}x",
                    ", ".join(f"{name} {1000 * s:.2f} ms" for name, s, _ in others),
                ]
            )
        if rows:
            text += f"\n### {shape.label}\n\n" + markdown_table(
                [
                    "candidate",
                    "profiled self time",
                    "matrix multiplies",
                    "matmul / LSTM call",
                    "largest other rows",
                ],
                rows,
            )
            text += "\n"
    return text


def fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def ratio(numerator: Candidate | None, denominator: Candidate | None) -> float | None:
    """``numerator.median / denominator.median``, or None when either has no figure."""
    if numerator is None or denominator is None:
        return None
    if numerator.median is None or denominator.median is None:
        return None
    return numerator.median / denominator.median


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def results_tables(
    results: dict[str, dict[str, Candidate]], names: list[str], shapes: list[Shape]
) -> str:
    """The ratio table, the targets of the performance issue and notes, as Markdown."""
    lstm = {shape.name: results[shape.name][BASELINE] for shape in shapes}
    rows = [
        ["torch.nn.LSTM, ms per call"]
        + [
            "-" if lstm[s.name].median is None else f"{1000 * lstm[s.name].median:.3f} ms"
            for s in shapes
        ]
    ]
    for name in names:
        cells = [results[s.name][name] for s in shapes]
        row = [LABELS.get(name, name)]
        for candidate, shape in zip(cells, shapes, strict=True):
            if candidate.note:
                row.append(candidate.note.split(":")[0])  # "skipped" or "error", see notes
            else:
                row.append(fmt_ratio(ratio(candidate, lstm[shape.name])))
        rows.append(row)
    for ours, reference in SPEEDUPS:
        if ours in names and reference in names:
            rows.append(
                [f"**{ours} vs {LABELS[reference]} speed-up**"]
                + [
                    fmt_ratio(ratio(results[s.name][reference], results[s.name][ours]))
                    for s in shapes
                ]
            )
    text = "Time per call as a ratio to torch.nn.LSTM (lower is faster; speed-up rows: higher "
    text += "is faster, ncps time / our time).\n\n"
    text += markdown_table(["cell"] + [s.label for s in shapes], rows)

    target_rows = []
    for shape in shapes:
        if "cfc" in names and shape.name in CFC_RATIO_TARGETS:
            target, ncps_figure = CFC_RATIO_TARGETS[shape.name]
            measured = ratio(results[shape.name]["cfc"], lstm[shape.name])
            met = "-" if measured is None else ("yes" if measured <= target else "no")
            issue = "-" if ncps_figure is None else f"ncps CfC {ncps_figure:.2f}x"
            target_rows.append(
                [f"cfc / LSTM, {shape.name}", fmt_ratio(measured), f"<= {target:.1f}x", issue, met]
            )
    for shape in shapes:
        if "ltc" in names and shape.name in LTC_RATIO_TARGETS:
            target = LTC_RATIO_TARGETS[shape.name]
            measured = ratio(results[shape.name]["ltc"], lstm[shape.name])
            met = "-" if measured is None else ("yes" if measured <= target else "no")
            target_rows.append(
                [f"ltc / LSTM, {shape.name}", fmt_ratio(measured), f"<= {target:.1f}x", "-", met]
            )
    for (ours, reference), targets in SPEEDUPS.items():
        for shape in shapes:
            if shape.name in targets and ours in names and reference in names:
                measured = ratio(results[shape.name][reference], results[shape.name][ours])
                target = targets[shape.name]
                met = "-" if measured is None else ("yes" if measured >= target else "no")
                target_rows.append(
                    [
                        f"{ours} vs {LABELS[reference]} speed-up, {shape.name}",
                        fmt_ratio(measured),
                        f">= {target:.1f}x",
                        "-",
                        met,
                    ]
                )
    if target_rows:
        text += "\n\nTargets of the performance issue (its ncps figures: 2-core CPU, 1 thread).\n\n"
        text += markdown_table(["figure", "measured", "target", "issue", "met"], target_rows)

    notes = []
    if ncps_torch is None:
        notes.append("ncps is not installed: the ncps CfC / LTC rows and speed-ups are absent.")
    for shape in shapes:
        for candidate in results[shape.name].values():
            label = LABELS.get(candidate.name, candidate.name)
            if candidate.note:
                notes.append(f"{shape.name} {label}: {candidate.note}")
            elif candidate.rounds < max(c.rounds for c in results[shape.name].values()):
                notes.append(
                    f"{shape.name} {label}: median of {len(candidate.samples)} rounds (slow)"
                )
    if notes:
        text += "\n\nNotes:\n\n" + "\n".join(f"- {note}" for note in notes)
    return text + "\n"


def csv_text(results: dict[str, dict[str, Candidate]], shapes: list[Shape]) -> str:
    """One row per (shape, candidate): raw median seconds per call, and how they were taken."""
    rows = []
    for shape in shapes:
        lstm = results[shape.name][BASELINE]
        for candidate in results[shape.name].values():
            value = ratio(candidate, lstm)
            rows.append(
                {
                    "shape": shape.name,
                    "batch": shape.batch,
                    "steps": shape.steps,
                    "inputs": shape.inputs,
                    "hidden": shape.hidden,
                    "backward": shape.backward,
                    "candidate": candidate.name,
                    "median_s": "" if candidate.median is None else f"{candidate.median:.6e}",
                    "min_s": f"{min(candidate.samples):.6e}" if candidate.samples else "",
                    "ratio_to_lstm": "" if value is None else f"{value:.4f}",
                    "rounds": len(candidate.samples),
                    "calls_per_block": candidate.calls_per_block,
                    "note": candidate.note,
                }
            )
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark with command-line arguments ``argv`` (``sys.argv[1:]`` when None)."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    shapes = [SHAPES[name] for name in args.shapes]
    names = [name for name in args.cells if ncps_torch is not None or name in CELLS]
    command = shlex.join(["python", *sys.argv])

    start = time.perf_counter()
    results: dict[str, dict[str, Candidate]] = {}
    for shape in shapes:
        print(f"{shape.label}", flush=True)
        results[shape.name] = bench_shape(shape, [BASELINE, *names], args, sync)
    elapsed = time.perf_counter() - start

    ncps_version = "not installed" if ncps_torch is None else importlib.metadata.version("ncps")
    header = "\n".join(
        [
            f"# Recurrent cells: time per call relative to torch.nn.LSTM ({args.device})",
            "",
            f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
            f"- torch {torch.__version__}, ncps {ncps_version}, Python {platform.python_version()}",
            f"- device: {args.device}, {machine_description(args.device)}",
            f"- threads: {args.threads}; repeats: {args.repeats} rounds, median (slow candidates: "
            f"at least {args.min_rounds}, within {args.max_seconds:g} s); "
            f"blocks >= {args.min_block_ms:g} ms",
            f"- took {elapsed:.0f} s; reproduce with: `{command}`",
        ]
    )
    report = header + "\n\n" + results_tables(results, names, shapes)
    if args.profile:
        report += "\n" + profile_tables(results, shapes)
    print("\n" + report)
    if args.out is not None:
        atomic_write_text(args.out, report)
        atomic_write_text(args.out.with_suffix(".csv"), csv_text(results, shapes))
        print(f"wrote {args.out} and {args.out.with_suffix('.csv')}")
