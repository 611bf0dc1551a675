"""What a training run of bench/run_cost.py did, read back from the bench stack's Prefect and MLflow servers.

- Every task run of the flow run: seconds per task (trials grouped by family), nothing left out.
- The flow's fixed cost: its process's wall time minus the wall time covered by the training work itself
  (`WORK_TASKS`: the search's trials, the refit, the holdout evaluation; LightGBM's fit on the Dask engine).
  Covered time is the union of those task runs' [start, end] intervals, so trials running side by side on
  the cluster count once.
- What ran: the engine (from the task names and the `engine` task's log line), and every MLflow param and tag
  of the run that names an engine, rows, a sample or a family (whatever the flow records there).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import datetime
from typing import Any

# The training work of a run; everything else in the flow is its fixed cost. A task run counts as work when its
# name (without Prefect's run suffix) is one of these or starts with one of them and a space ("trial lightgbm").
# `trial`: one configuration cross-validated by the search; `refit`: the chosen configuration on all training rows;
# `evaluate`: the holdout metrics and plots; `train-big`: the Dask engine's LightGBM fit on every training row.
# Task names change with the flow (tasks/search_trials.py, tasks/evaluation.py, tasks/dask_training.py): a new
# kind of work (a sampled search on the Dask engine, say) is added here, and every task's seconds are listed in
# the output either way, so a misfiled task shows.
WORK_TASKS = ("trial", "refit", "evaluate", "train-big", "fit-big")  # fit-big: the final fit on every row

# MLflow params and tags that say what ran where and on how many rows (not the chosen hyperparameters, `best_*`)
# (`training.*`: the run's record of its engine, search and final fit, core/modeling/training_record.py)
WHAT_RAN = re.compile(r"^training\.|engine|rows|sample|cluster|dask|^best_family$", re.IGNORECASE)
# The flow's log lines that say how many rows the search and the final fit used ("3-fold CV on 15987 rows",
# "refitted on 15987 rows"); the first match of each, else None (every line naming rows is in `rows_log`).
ROWS_SEARCHED = re.compile(r"\b(?:CV|search\w*|sampled?)\b[^.;]*? on ([\d,]+) (?:training )?rows", re.IGNORECASE)
ROWS_FITTED = re.compile(r"\b(?:refit\w*|fit\w*|trained)\b[^.;]*? on ([\d,]+) (?:training )?rows", re.IGNORECASE)


def task_group(name: str) -> str:
    """A task run's task: its name without Prefect's `-<suffix>` ("evaluate-2f1" -> "evaluate").

    Trial runs are named `trial <family>-<n>`: their group is the family's trials ("trial logistic_regression").
    """
    return name.rsplit("-", 1)[0] if "-" in name else name


def is_work(group: str) -> bool:
    """Whether a task group is training work (`WORK_TASKS`) rather than fixed cost."""
    return any(group == work or group.startswith(work + " ") for work in WORK_TASKS)


def covered_seconds(intervals: list[tuple[datetime, datetime]]) -> float:
    """Seconds covered by the union of the intervals."""
    total, end = 0.0, None
    for start, stop in sorted(intervals):
        if end is None or start > end:
            total += (stop - start).total_seconds()
            end = stop
        elif stop > end:
            total += (stop - end).total_seconds()
            end = stop
    return total


def flow_run_of(tag: str) -> dict[str, Any] | None:
    """The newest flow run tagged `tag` (`mlops train` tags its runs `model:<name>`), with its task runs."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        FlowRunFilterTags,
        LogFilter,
        LogFilterFlowRunId,
    )
    from prefect.client.schemas.sorting import FlowRunSort, LogSort

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[tag])), sort=FlowRunSort.START_TIME_DESC, limit=1
        )
        if not runs:
            return None
        run = runs[0]
        tasks = _pages(
            lambda offset: client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])), limit=PAGE, offset=offset
            )
        )
        logs = _pages(
            lambda offset: client.read_logs(
                log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])),
                limit=PAGE,
                offset=offset,
                sort=LogSort.TIMESTAMP_ASC,
            )
        )
    return {"run": run, "tasks": tasks, "logs": [log.message for log in logs]}


PAGE = 200  # the Prefect server's largest page


def _pages(read: Callable[[int], list[Any]]) -> list[Any]:
    """Every item of a paged Prefect read."""
    items: list[Any] = []
    while True:
        page = read(len(items))
        items += page
        if len(page) < PAGE:
            return items


def breakdown(found: dict[str, Any], process_wall: float) -> dict[str, Any]:
    """Seconds per task, the work/fixed split and the flow run's own span."""
    run, tasks = found["run"], found["tasks"]
    groups: dict[str, dict[str, Any]] = {}
    work_intervals, all_intervals = [], []
    for task in tasks:
        group = task_group(task.name)
        entry = groups.setdefault(group, {"runs": 0, "seconds": 0.0, "work": is_work(group)})
        entry["runs"] += 1
        if task.start_time and task.end_time:
            entry["seconds"] += (task.end_time - task.start_time).total_seconds()
            all_intervals.append((task.start_time, task.end_time))
            if entry["work"]:
                work_intervals.append((task.start_time, task.end_time))
        else:
            entry["state"] = task.state_name
    for entry in groups.values():
        entry["seconds"] = round(entry["seconds"], 2)
    span = (run.end_time - run.start_time).total_seconds() if run.start_time and run.end_time else None
    work = covered_seconds(work_intervals)
    return {
        "flow_run_id": str(run.id),
        "flow_run_state": run.state_name,
        "flow_run_seconds": round(span, 2) if span is not None else None,
        "process_outside_flow_run_s": round(process_wall - span, 2) if span is not None else None,
        "work_tasks": list(WORK_TASKS),
        "work_covered_s": round(work, 2),
        "work_sum_s": round(sum(e["seconds"] for e in groups.values() if e["work"]), 2),
        "fixed_s": round(process_wall - work, 2),
        "fixed_in_flow_run_s": round(span - work, 2) if span is not None else None,
        # the flow run's time in no task run at all (the flow function's own code between tasks)
        "in_no_task_s": round(span - covered_seconds(all_intervals), 2) if span is not None else None,
        "tasks": dict(sorted(groups.items(), key=lambda kv: -kv[1]["seconds"])),
        "engine": "dask" if "train-big" in groups else "pandas",
        "engine_log": [line for line in found["logs"] if re.match(r"engine \w+", line)][:3],
        "rows_searched": _first(ROWS_SEARCHED, found["logs"]),
        "rows_fitted": _first(ROWS_FITTED, found["logs"]),
        "rows_log": [line[:300] for line in found["logs"] if re.search(r"\brows\b", line)][:12],
    }


def _first(pattern: re.Pattern[str], lines: list[str]) -> int | None:
    for line in lines:
        match = pattern.search(line)
        if match:
            return int(match.group(1).replace(",", ""))
    return None


def mlflow_what_ran(experiment: str) -> dict[str, Any]:
    """The newest MLflow run of `experiment`: its params and tags about engine, rows, samples and families."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return {}
    runs = client.search_runs([found.experiment_id], order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        return {}
    data = runs[0].data
    return {
        "run_id": runs[0].info.run_id,
        "params": {k: v[:200] for k, v in sorted(data.params.items()) if WHAT_RAN.search(k)},
        "tags": {k: v[:200] for k, v in sorted(data.tags.items()) if WHAT_RAN.search(k)},
        "metrics": {k: round(v, 5) for k, v in sorted(data.metrics.items()) if k.startswith(("holdout_", "cv_"))},
    }


def mark_crashed(flow_run_id: str, why: str) -> None:
    """A flow run whose process the bench killed: Crashed, as the stack's zombie-run automation would mark it later."""
    from prefect.client.orchestration import get_client
    from prefect.states import Crashed

    with get_client(sync_client=True) as client:
        run = client.read_flow_run(flow_run_id)
        if not run.state or not run.state.is_final():
            client.set_flow_run_state(flow_run_id, Crashed(message=f"stopped by bench/run_cost.py: {why}"), force=True)
