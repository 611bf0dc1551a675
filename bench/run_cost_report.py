"""bench/results/run_cost.md from bench/run_cost.py's results: a table per item, the date and the machine."""

from __future__ import annotations

from typing import Any

# The full run's sizes (bench/run_cost.py's defaults)
FULL = {
    "rows": [100_000, 1_000_000, 10_000_000],
    "scoring_rows": 10_000_000,
    "command": "`python -m bench.run_cost`: 100k, 1M and 10M rows, 10M scored",
}

# Roles with several long-lived processes, each shown on its own (every process is in the JSON)
PER_PROCESS = ("dask-workers", "serving", "mlflow", "prefect", "worker", "s3", "dask-scheduler")


def _mb(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def _rows(value: int) -> str:
    return f"{value / 1e6:g}M" if value >= 1_000_000 else f"{value / 1e3:g}k" if value >= 1000 else str(value)


def _peak(run: dict[str, Any], role: str) -> int | None:
    found = run["phase"]["roles"].get(role)
    return found["peak_rss_mb"] if found else None


def _rss(run: dict[str, Any], role: str) -> str:
    """The sampled peak of the process tree, and the kernel's peak of its largest process when that is higher."""
    sampled, kernel = _peak(run, role), run.get("kernel_max_rss_mb")
    return _mb(sampled) + (f" (kernel {_mb(kernel)})" if kernel and (sampled is None or kernel > sampled) else "")


def _side(run: dict[str, Any], role: str) -> str:
    """A run's wall time, or why it did not finish (with its time and peak RSS)."""
    if run["outcome"] == "completed":
        return f"{run['wall_s']:.1f} s"
    return f"did not finish ({run['outcome']}, {run['wall_s']:.0f} s, peak {_mb(_peak(run, role))} MB)"


def _what_ran(flow: dict[str, Any]) -> tuple[str, str]:
    """The engine (and the chosen family), and the rows searched / fitted as the run says them."""
    recorded = (flow.get("mlflow") or {}).get("params", {}) | (flow.get("mlflow") or {}).get("tags", {})
    breakdown = flow.get("breakdown") or {}
    engines = {v for k, v in recorded.items() if "engine" in k.lower()} or {breakdown.get("engine", "?")}
    engine = ", ".join(sorted(engines)) + (f" ({recorded['best_family']})" if "best_family" in recorded else "")
    if "training.search_rows" in recorded:  # the run's own record (core/modeling/training_record.py)
        where = [recorded.get("training.search_where", "?"), recorded.get("training.fit_where", "?")]
        rows = [recorded["training.search_rows"], recorded.get("training.fit_rows", "?")]
        shown = [f"{int(n):,} ({w})" if n.isdigit() else f"{n} ({w})" for n, w in zip(rows, where, strict=True)]
        return engine, " / ".join(shown) + (
            f"; {recorded['training.fit_reason']}" if "training.fit_reason" in recorded else ""
        )
    searched, fitted = breakdown.get("rows_searched"), breakdown.get("rows_fitted")
    if searched or fitted:
        return engine, " / ".join("?" if n is None else f"{n:,}" for n in (searched, fitted))
    rows = [f"{k}={v}" for k, v in recorded.items() if "rows" in k.lower() or "sample" in k.lower()]
    return engine, "; ".join(rows) or "not recorded by the run"


def _training(results: dict[str, Any]) -> list[str]:
    lines = [
        "## 1. The flow against a bare scikit-learn script",
        "",
        "`mlops train` on the bundled credit-risk config pointed at the rows (its default search and engine), and a "
        "bare script doing the same read, split, search and evaluation (bench/run_cost_bare.py), each in its own "
        "process. Fixed cost: the flow's wall time minus the time covered by its training work (task runs "
        f"{', '.join(f'`{w}`' for w in _work(results))}). Peak RSS: the process tree's, sampled every 0.5 s "
        "(in brackets the kernel's peak of its largest process, when the samples missed it).",
        "",
        "| rows | engine | rows searched / fitted | bare script | flow | flow / bare | fixed cost | training work "
        "| flow peak RSS MB | bare peak RSS MB |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for entry in results["training"]:
        flow, bare = entry["flow"], entry["bare"]
        engine, rows = _what_ran(flow)
        breakdown = flow.get("breakdown") or {}
        ratio = "-"
        if flow["outcome"] == "completed" and bare["outcome"] == "completed":
            ratio = f"{flow['wall_s'] / bare['wall_s']:.2f}x"
        elif flow["outcome"] == "completed":
            ratio = f"< {flow['wall_s'] / bare['wall_s']:.2f}x"
        fixed, work = breakdown.get("fixed_s"), breakdown.get("work_covered_s")
        if flow["outcome"] != "completed":
            fixed = work = None  # a stopped run has no fixed cost to speak of
        cells = [
            f"{entry['rows']:,}", engine, rows, _side(bare, "bare"), _side(flow, "flow"), ratio,
            "-" if fixed is None else f"{fixed:.1f} s", "-" if work is None else f"{work:.1f} s",
            _rss(flow, "flow"), _rss(bare, "bare"),
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "### Where the flow's time went", ""]
    lines.append("Seconds per task (summed over its task runs; runs in brackets; `*` training work, the rest fixed):")
    lines.append("")
    for entry in results["training"]:
        breakdown = entry["flow"].get("breakdown")
        if not breakdown:
            lines.append(f"- {entry['rows']:,} rows: no flow run found ({entry['flow']['outcome']})")
            continue
        tasks = ", ".join(
            f"{'*' if t['work'] else ''}{name} {t['seconds']:.2f} ({t['runs']})"
            for name, t in breakdown["tasks"].items()
        )
        lines.append(
            f"- {entry['rows']:,} rows: flow run {breakdown['flow_run_seconds']} s of the process's "
            f"{entry['flow']['wall_s']} s ({breakdown['process_outside_flow_run_s']} s outside it: start-up, imports, "
            f"report), {breakdown.get('in_no_task_s')} s of it in no task run; "
            f"work covered {breakdown['work_covered_s']} s (summed {breakdown['work_sum_s']} s); "
            f"tasks: {tasks}"
        )
        bare = entry["bare"].get("result")
        if bare:
            lines.append(f"  - bare script phases: {', '.join(f'{k} {v} s' for k, v in bare['phases_s'].items())}")
    return lines


def _work(results: dict[str, Any]) -> list[str]:
    for entry in results["training"]:
        if entry["flow"].get("breakdown"):
            return entry["flow"]["breakdown"]["work_tasks"]
    return []


def _phases(results: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    phases = []
    for entry in results["training"]:
        phases += [(f"flow {_rows(entry['rows'])}", entry["flow"]["phase"])]
        phases += [(f"bare {_rows(entry['rows'])}", entry["bare"]["phase"])]
    for run in (results.get("scoring") or {}).get("results", []):
        phases.append((f"scoring {run['config']}", run["phase"]))
    if results.get("idle"):
        phases.append(("idle", results["idle"]))
    return phases


def _roles(results: dict[str, Any]) -> list[str]:
    phases = _phases(results)
    if not phases:
        return []
    stack = sorted({role for _, phase in phases for role in phase["roles"]} - {"flow", "bare", "scoring"})
    lines = [
        "## Every process: peak RSS and CPU by role, per phase",
        "",
        "### Peak RSS of every role (MB; processes at the peak in brackets)",
        "",
        "Each server of the stack with every process it started (PostgreSQL's backends, MLflow's and the serving "
        "API's workers, each Dask worker under its nanny), the flow's and the bare script's process trees; per "
        "phase, the largest sum of a role's RSS at one sample (shared pages count in each process).",
        "",
        "| role | " + " | ".join(name for name, _ in phases) + " |",
        "|---|" + "---:|" * len(phases),
    ]
    for role in ["flow", "bare", "scoring", *stack]:
        cells = []
        for _, phase in phases:
            found = phase["roles"].get(role)
            cells.append(f"{found['peak_rss_mb']:,} ({found['peak_processes']})" if found else "-")
        if any(c != "-" for c in cells):
            lines.append(f"| {role} | " + " | ".join(cells) + " |")
    lines += ["", "Largest processes of the stack over the whole bench (peak RSS, MB):", ""]
    for role in stack:
        if role not in PER_PROCESS and role != "postgres":
            continue
        peaks: dict[str, tuple[str, int]] = {}
        for _, phase in phases:
            for pid, process in phase["roles"].get(role, {}).get("processes", {}).items():
                if process["peak_rss_mb"] > peaks.get(pid, ("", -1))[1]:
                    peaks[pid] = (process["label"], process["peak_rss_mb"])
        top = sorted(peaks.items(), key=lambda kv: -kv[1][1])[:6]
        shown = "; ".join(f"{label} (pid {pid}) {mb:,}" for pid, (label, mb) in top)
        lines.append(f"- {role}: {len(peaks)} processes seen; {shown}")
    lines += ["", "### CPU seconds of every role during each phase", ""]
    lines += ["| role | " + " | ".join(name for name, _ in phases) + " |", "|---|" + "---:|" * len(phases)]
    for role in ["flow", "bare", "scoring", *stack]:
        cells = [f"{phase['roles'][role]['cpu_seconds']:.1f}" if role in phase["roles"] else "-" for _, phase in phases]
        if any(c != "-" for c in cells):
            lines.append(f"| {role} | " + " | ".join(cells) + " |")
    busy = [str(phase["machine_busy_cores"]) for _, phase in phases]
    load = [f"{phase['load_average_1min'][0]} / {phase['load_average_1min'][1]}" for _, phase in phases]
    lines.append("| whole machine (busy cores on average) | " + " | ".join(busy) + " |")
    lines.append("| load average, start / end | " + " | ".join(load) + " |")
    return lines


def _scoring(results: dict[str, Any]) -> list[str]:
    scoring = results.get("scoring")
    if not scoring:
        return []
    lines = [f"## 2. Batch scoring of {scoring['rows']:,} rows", ""]
    if "error" in scoring:
        return [*lines, "Preparing the data and model failed:", "", "```", *scoring["error"], "```"]
    lines += [
        "bench/scoring_scale.py's data (12 Parquet files) and registered model, its `scoring` flow per "
        f"configuration in its own process (data and model prepared in {scoring['prepare_s']} s, not counted).",
        "",
        "| config | outcome | process wall s | flow wall s | rows/s (flow) | scoring step s | rows/s (scoring step) "
        "| process peak RSS MB |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for run in scoring["results"]:
        r = run.get("result") or {}
        if "rows_per_second" not in r:
            lines.append(f"| {run['config']} | {run['outcome']} {r.get('error', '')} | {run['wall_s']} | | | | | |")
            continue
        lines.append(
            f"| {run['config']} | {run['outcome']} | {run['wall_s']} | {r['flow_seconds']} | {r['rows_per_second']:,} "
            f"| {r['scoring_seconds']} | {r['scoring_rows_per_second']:,} | {_mb(_peak(run, 'scoring'))} |"
        )
    return lines


def _idle(results: dict[str, Any]) -> list[str]:
    idle = results.get("idle")
    if not idle:
        return []
    lines = [
        "## 3. The stack idle",
        "",
        f"Nothing running (after {idle['settle_s']:.0f} s of quiet), {idle['seconds']} s sampled every 0.5 s: "
        f"**{idle['cpu_seconds']} CPU seconds, {idle['pct_of_one_core']} % of one core** for the whole stack "
        f"(the machine was busy {idle['machine_busy_cores']} cores on average: other work shares it).",
        "",
        "| role | CPU s | % of one core | processes | peak RSS MB | PSS MB at the end |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for role, stats in sorted(idle["roles"].items(), key=lambda kv: -kv[1]["cpu_seconds"]):
        lines.append(
            f"| {role} | {stats['cpu_seconds']:.2f} | {idle['pct_by_role'][role]:.2f} | {stats['peak_processes']} "
            f"| {stats['peak_rss_mb']:,} | {_mb(stats.get('pss_at_end_mb'))} |"
        )
    total = sum(stats["peak_rss_mb"] for stats in idle["roles"].values())
    pss = sum(stats.get("pss_at_end_mb") or 0 for stats in idle["roles"].values())
    lines.append(f"| whole stack | {idle['cpu_seconds']:.2f} | {idle['pct_of_one_core']:.1f} | | {total:,} | {pss:,} |")
    return lines


def markdown(results: dict[str, Any]) -> str:
    """The report."""
    m = results["machine"]
    lines = [
        "# What a run costs (bench/run_cost.py, issue 29)",
        "",
        f"{results['when']}; {m['cores']} cores ({m['cpu']}), {m['memory_gib']} GiB, {m['system']}, Python "
        f"{m['python']}, OMP_NUM_THREADS {m['omp_num_threads']}. `{results['command']}`; its own stack "
        f"(up in {results.get('stack', {}).get('up_s', '-')} s: {', '.join(results.get('stack', {}).get('roles', []))})"
        + (f"; {results['total_s']:.0f} s in all." if "total_s" in results else "."),
        "",
    ]
    options = results.get("options", {})
    if options.get("rows") != FULL["rows"] or options.get("scoring_rows") != FULL["scoring_rows"]:
        lines += [f"**Not the full run** ({FULL['command']}): smaller sizes, to try the bench.", ""]
    if results["training"]:
        lines += [*_training(results), ""]
    lines += [*_scoring(results), ""]
    lines += [*_idle(results), ""]
    lines += [*_roles(results), ""]
    return "\n".join(lines).rstrip() + "\n"
