"""Write the synthetic dataset as monthly Parquet partitions (S3 or a local folder)."""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TypedDict, Unpack

from adapters.clients import S3Location, put_bytes
from adapters.settings import Settings
from core.data.synthetic import DriftSpec, generate_month

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SyntheticMonths:
    """Which months of the synthetic dataset to generate: months `first_month .. first_month + months - 1`.

    The same fields give the same rows: `seed` drives the generator, `start` is the calendar month of index 0
    and `drift` (None: none) shifts the months from its own start on.
    """

    months: int
    rows_per_month: int
    seed: int = 42
    start: str = "2025-01"
    drift: DriftSpec | None = None
    first_month: int = 0


class _MoreMonths(TypedDict, total=False):
    """The optional fields of `SyntheticMonths` after its seed, as keyword arguments of `write_months`."""

    start: str
    drift: DriftSpec | None
    first_month: int


def partition_name(month: str) -> str:
    """Relative key of a month's partition."""
    return f"month={month}/part-0.parquet"


def write_partitions(settings: Settings, dest: str, spec: SyntheticMonths) -> list[str]:
    """Generate the months `spec` names and write one Parquet file per month under `dest` (s3:// or a folder).

    Returns the written URIs or paths. Re-running with the same arguments rewrites identical files.
    """
    written = []
    for index in range(spec.first_month, spec.first_month + spec.months):
        frame = generate_month(index, spec.rows_per_month, spec.seed, start=spec.start, drift=spec.drift)
        month = str(frame["application_date"].iloc[0])[:7]
        buffer = io.BytesIO()
        frame.to_parquet(buffer, index=False)
        if dest.startswith("s3://"):
            target = put_bytes(
                settings,
                S3Location.parse(dest).child(partition_name(month)),
                buffer.getvalue(),
                "application/x-parquet",
            )
        else:
            path = Path(dest) / partition_name(month)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(buffer.getvalue())
            target = str(path)
        log.info("wrote %s rows for %s to %s", len(frame), month, target)
        written.append(target)
    return written


def write_months(
    settings: Settings, dest: str, months: int, rows_per_month: int, seed: int = 42, **more: Unpack[_MoreMonths]
) -> list[str]:
    """`write_partitions` with the `SyntheticMonths` fields as arguments (`start`, `drift`, `first_month` by name)."""
    return write_partitions(settings, dest, SyntheticMonths(months, rows_per_month, seed, **more))


def write_applicant_history(
    settings: Settings,
    months: int,
    rows_per_month: int,
    seed: int = 42,
    start: str = "2025-01",
    drift: DriftSpec | None = None,
) -> tuple[str, int]:
    """The applicants' event history for months `0 .. months - 1`, as the feature store's offline table on S3.

    The applications are regenerated (same arguments, same rows as `write_months`), so the history always
    matches the partitions; returns the table's URI and its row count.
    """
    import pandas as pd

    from adapters.feature_store import write_history
    from core.data.synthetic import generate_history

    applications = pd.concat(
        [generate_month(i, rows_per_month, seed, start=start, drift=drift) for i in range(months)], ignore_index=True
    )
    return write_history(settings, generate_history(applications, seed))
