"""The Dask engine's model search and final fit (pure): which families, which rows, and where the fit runs.

The search cross-validates the configured families plus `lightgbm` (`search_spec`) on the search sample
(`core.dask_engine.split.sample_threshold`, collected into the flow's process). The chosen configuration is
then fitted on every training row (`plan_fit`): LightGBM by its Dask estimator on the cluster; any other family
in the flow's process when the training rows fit in its memory, else on the largest sample by id hash that does,
and the run and the model card say so.

The memory estimate (`fit_bytes_per_row`) is measured on the rows, not read from the Parquet footers: their
uncompressed sizes are those of the encoded pages (dictionaries, run lengths), 32 bytes a row for the bundled
table against 417 bytes a row for the same rows as a pandas frame. Fitting the bundled table's 400,000 rows
(33 model inputs) added 700-840 bytes a row to the frame's 417 at the process's peak, whatever the family
(logistic regression, decision tree, random forest, histogram gradient boosting, LightGBM); the estimate,
2 x 417 + 3 x 8 x 33 = 1,626 bytes a row, stays above the measured 1,117-1,257.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from core.dask_engine.split import EVERY_TRAINING_ROW, fit_sample_threshold
from core.data.dataset import DatasetConfig, TaskType
from core.modeling.model_families import ModelFamily
from core.modeling.search import SearchSpec
from core.modeling.training_record import DASK_CLUSTER, FLOW_PROCESS

# Share of the memory available when the fit is planned that the fit may take (the rest: the process's own
# frames, the workers' growth, the rest of the machine).
FIT_MEMORY_SHARE = 0.5
FRAME_COPIES = 2  # the collected frame and its `prepare_inputs` copy
MATRIX_COPIES = 3  # the preprocessor's blocks, the stacked float64 matrix and the estimator's own copy


def search_spec(spec: SearchSpec, task: TaskType) -> SearchSpec:
    """The search on the Dask engine: the configured families (or the task's defaults) and `lightgbm`."""
    families = spec.families_for(task)
    if ModelFamily.lightgbm not in families:
        families = [*families, ModelFamily.lightgbm]
    return spec.model_copy(update={"families": families})


def fit_bytes_per_row(frame_bytes_per_row: float, model_inputs: int) -> float:
    """Memory a fit in the flow's process takes per training row: the frame twice, the float64 inputs thrice."""
    return FRAME_COPIES * frame_bytes_per_row + MATRIX_COPIES * 8 * model_inputs


@dataclass(frozen=True)
class FitPlan:
    """Where the chosen configuration is fitted, on which rows, and why when not on every training row.

    Attributes:
        where: `flow process` or `dask cluster`.
        below: Training ids whose bucket is below this are fitted on (`EVERY_TRAINING_ROW`: all of them).
        reuse: The search's own refit (on the search sample) is the final fit: nothing more is fitted.
        reason: Why the fit sees fewer than every training row (None: it sees every one).
    """

    where: str
    below: int
    reuse: bool = False
    reason: str | None = None


def plan_fit(  # noqa: PLR0913 - the plan's inputs, each a number from a different place
    config: DatasetConfig,
    family: str,
    rows_train: int,
    rows_sample: int,
    bytes_per_row: float,
    available_bytes: float,
    share: float = FIT_MEMORY_SHARE,
) -> FitPlan:
    """Where and on which rows the chosen `family` is fitted, for `rows_train` training rows.

    `rows_sample` is the search sample's size, `bytes_per_row` a fit's memory per row (`fit_bytes_per_row`),
    `available_bytes` the memory available to the flow's process now.
    """
    if rows_sample >= rows_train:  # the search saw every training row: its refit is the fit on all of them
        return FitPlan(FLOW_PROCESS, EVERY_TRAINING_ROW, reuse=True)
    if family == ModelFamily.lightgbm:
        return FitPlan(DASK_CLUSTER, EVERY_TRAINING_ROW)
    need, budget = rows_train * bytes_per_row, share * available_bytes
    if need <= budget:
        return FitPlan(FLOW_PROCESS, EVERY_TRAINING_ROW)
    fit_rows = math.floor(budget / bytes_per_row)
    why = (
        f"every one of the {rows_train:,} training rows would need about {need / 2**30:.1f} GiB in the flow's "
        f"process ({bytes_per_row:,.0f} bytes a row, estimated on the search sample), more than {share:.0%} of the "
        f"{available_bytes / 2**30:.1f} GiB available there"
    )
    way_out = "(the lightgbm family fits every row on the cluster; or give the flow's machine more memory)"
    if fit_rows <= rows_sample:
        return FitPlan(
            FLOW_PROCESS,
            EVERY_TRAINING_ROW,
            reuse=True,
            reason=f"{why}, and no sample bigger than the search's does: the search's own fit on its "
            f"{rows_sample:,} rows is shipped {way_out}",
        )
    below = fit_sample_threshold(config, rows_train, fit_rows)
    return FitPlan(
        FLOW_PROCESS,
        below,
        reason=f"{why}: fitted on the largest sample by id hash that fits, about {fit_rows:,} rows {way_out}",
    )
