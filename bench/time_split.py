"""What a random holdout promises on a time-ordered table, against what the model then does on later rows.

For each time-ordered table that a package ships (vega_datasets: `sf-temps`, hourly temperatures in San
Francisco for 2010; `seattle-weather`, daily weather in Seattle 2012-2015), the latest 20 % of the rows by date
are kept outside as "the future". On the other rows the project trains its model twice, with the same search,
seed and calendar features of the date, once for each holdout strategy of the dataset config:

- `random`: the holdout is ids by hash (what every table got before the time-aware split);
- `time`: the holdout is the latest period of the rows (the default with a time column).

Each model's score on its own holdout (what the run reports and the gates judge) is set beside its score on the
future rows (what it then does). The gap is how much the holdout flatters the model.

    python -m bench.time_split [--trials 4]

Results: bench/results/time_split.{json,md}. In-process (the search of `core.modeling.search`), no stack.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import mean_squared_error

from core.data.dataset import DatasetConfig
from core.data.features import prepare_inputs, prepare_target
from core.data.split import split_frame
from core.modeling.search import SearchSpec, search_models

RESULTS = Path(__file__).parent / "results"
FUTURE = 0.2
SEED = 42


@dataclass(frozen=True)
class Row:
    """One table and strategy: the holdout's RMSE (promised) and the future's (delivered)."""

    table: str
    strategy: str
    rows_train: int
    rows_holdout: int
    rows_future: int
    chosen: str
    holdout_rmse: float
    future_rmse: float
    seconds: float

    @property
    def flattery(self) -> float:
        """How much lower the holdout's RMSE is than the future's, as a share of the future's."""
        return 1 - self.holdout_rmse / self.future_rmse


def tables() -> dict[str, tuple[pd.DataFrame, str, list[dict]]]:
    """Name -> (frame with `row_id` and `date`, target, feature specs)."""
    from vega_datasets import data

    weather = data.seattle_weather()
    return {
        "sf-temps": (data.sf_temps(), "temp", []),
        "seattle-weather": (
            weather,
            "temp_max",
            [
                {"name": "precipitation", "type": "numeric"},
                {"name": "temp_min", "type": "numeric"},
                {"name": "wind", "type": "numeric"},
                {"name": "weather", "type": "categorical"},
            ],
        ),
    }


def _config(name: str, target: str, features: list[dict], strategy: str) -> DatasetConfig:
    return DatasetConfig.model_validate(
        {
            "name": name,
            "model_name": name,
            "source": f"/{name}.parquet",
            "target": target,
            "task": "regression",
            "id_column": "row_id",
            "time_column": "date",
            "time_features": True,
            "split": {"strategy": strategy},
            # a table of only dates needs one feature; the calendar parts are the model's inputs
            "features": features or [{"name": "constant_zero", "type": "numeric"}],
        }
    )


def run_table(name: str, frame: pd.DataFrame, target: str, features: list[dict], trials: int) -> list[Row]:
    """Both strategies on one table."""
    frame = frame.sort_values("date", kind="stable", ignore_index=True)
    frame.insert(0, "row_id", np.arange(len(frame)))
    if not features:
        frame["constant_zero"] = 0.0
    cut = int(len(frame) * (1 - FUTURE))
    known, future = frame.iloc[:cut].reset_index(drop=True), frame.iloc[cut:].reset_index(drop=True)
    rows = []
    for strategy in ("random", "time"):
        config = _config(name, target, features, strategy)
        started = time.perf_counter()
        split = split_frame(known, config)
        result = search_models(split.train, config, SearchSpec(trials_per_family=trials), SEED)

        def rmse(part: pd.DataFrame, config: DatasetConfig = config, model=result.model) -> float:
            predicted = model.predict(prepare_inputs(part, config))
            return float(np.sqrt(mean_squared_error(prepare_target(part, config), predicted)))

        rows.append(
            Row(
                name,
                strategy,
                len(split.train),
                len(split.holdout),
                len(future),
                result.family,
                rmse(split.holdout),
                rmse(future),
                time.perf_counter() - started,
            )
        )
    return rows


def markdown(rows: list[Row], when: str) -> str:
    """The results as a Markdown table."""
    lines = [
        f"Time-aware holdout, {when} (`python -m bench.time_split`): RMSE on the run's own holdout vs on the",
        f"latest {FUTURE:.0%} of the table, kept outside (the future). Flattery: how much lower the holdout's RMSE is.",
        "",
        "| table | holdout | train / holdout / future rows | chosen | holdout RMSE | future RMSE | flattery |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r.table} | {r.strategy} | {r.rows_train:,} / {r.rows_holdout:,} / {r.rows_future:,} | {r.chosen} "
        f"| {r.holdout_rmse:.3f} | {r.future_rmse:.3f} | {r.flattery:.0%} |"
        for r in rows
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    """Run every table, print and store the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=4, help="Optuna trials per model family")
    args = parser.parse_args()
    rows = [row for name, spec in tables().items() for row in run_table(name, *spec, trials=args.trials)]
    when = datetime.now(UTC).strftime("%Y-%m-%d")
    text = markdown(rows, when)
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "time_split.md").write_text(text)
    payload = {"date": when, "rows": [asdict(r) | {"flattery": r.flattery} for r in rows]}
    (RESULTS / "time_split.json").write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
