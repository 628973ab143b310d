"""The committed results are what the repository's files give now: every run under results/
(the README's figures, the benchmark) was trained with the settings its agent and task files
give today. Tuning an agent on a task (which writes overrides.<task> into the agent file) makes
the runs of that agent on that task stale, and this test names them: run their commands again
(or retire the figures that quote them). A robustness sweep's runs must be committed runs too, and
the README quotes its tables as the sweep wrote them."""

from __future__ import annotations

import csv
import dataclasses
import re
from pathlib import Path

from cfc_rl.experiment.compare import plan_jobs
from cfc_rl.experiment.jobs import stale_runs
from cfc_rl.experiment.runs import RunFolder

ROOT = Path(__file__).resolve().parent.parent


def test_every_committed_run_was_trained_with_the_files_as_they_are(monkeypatch) -> None:
    monkeypatch.chdir(ROOT)  # the runs name their agent and task files from the repository root
    # results/<study>/runs/: the committed runs (a search's trial runs are not kept)
    runs = sorted(p.parent for p in (ROOT / "results").glob("*/runs/**/result.json"))
    assert len(runs) > 40
    jobs = []
    for folder in runs:
        run = RunFolder(folder)
        config, result = run.read_config(), run.read_result()
        assert result is not None, folder
        [job] = plan_jobs(
            [config["agent"]["source"]],
            [config["task"]["source"]],
            seeds=[config["seed"]],
            steps=result["total_timesteps"],
        )
        jobs.append(dataclasses.replace(job, run_dir=str(folder)))
    stale = stale_runs(jobs)
    assert not stale, "runs trained with other settings than the files give now:\n" + "\n".join(
        stale
    )


def test_robustness_sweeps_evaluated_committed_runs() -> None:
    # A sweep's table is only as current as the runs it evaluated: they must be committed runs,
    # which the test above holds to the files.
    tables = sorted((ROOT / "results").glob("*/robustness_runs.csv"))
    assert tables
    for table in tables:
        with table.open(newline="") as f:
            folders = {row["run"] for row in csv.DictReader(f)}
        assert folders, table
        for folder in sorted(folders):
            assert (ROOT / folder / "result.json").is_file(), (
                f"{table.relative_to(ROOT)} evaluated {folder}, which is not a committed run"
            )


def test_the_readme_quotes_the_robustness_tables_as_written() -> None:
    # The README copies a sweep's tables; they must be the ones `cfc-rl robustness` wrote.
    readme = (ROOT / "README.md").read_text()
    quoted = [
        path
        for path in sorted((ROOT / "results").glob("*/robustness.md"))
        if f"{path.parent.relative_to(ROOT)}/" in readme
    ]
    assert quoted
    for path in quoted:
        tables = re.findall(r"(?:^\|.*\n)+", path.read_text(), flags=re.MULTILINE)
        assert tables, path
        for table in tables:
            assert table in readme, f"the README's copy of a table in {path} differs from it"
