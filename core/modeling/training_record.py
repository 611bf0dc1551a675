"""What ran where, on how many rows: the record of one training run's search and final fit (pure).

The pandas engine searches on every training row up to `search_sample_rows` (on a sample of them above) and fits
the chosen configuration on every one; the Dask engine searches on a sample of the
training rows and fits the chosen configuration on all of them (LightGBM on the cluster, other families in
the flow's process, or on the largest sample that fits there). The run's tags (`tags`) and the model card
(`card_rows`) say which, so nobody has to guess from the engine's name.
"""

from __future__ import annotations

from dataclasses import dataclass

FLOW_PROCESS = "flow process"
DASK_CLUSTER = "dask cluster"


@dataclass(frozen=True)
class TrainingRecord:
    """Where the model search and the final fit ran, and on how many rows.

    Attributes:
        engine: `pandas` (the snapshot in the flow's process) or `dask` (its partitions on the cluster).
        rows_train: Every training row (the holdout excluded).
        search_rows: Rows the search's cross-validated trials saw.
        search_families: The families searched, in order.
        search_where: Where the trials ran (`flow process` or `dask cluster`).
        fit_rows: Rows the shipped configuration was fitted on.
        fit_where: Where that fit ran.
        fit_reason: Why the fit saw fewer than every training row, or how it was reused (None: every row).
    """

    engine: str
    rows_train: int
    search_rows: int
    search_families: tuple[str, ...]
    search_where: str
    fit_rows: int
    fit_where: str
    fit_reason: str | None = None

    @property
    def sampled_search(self) -> bool:
        """Whether the search saw a sample rather than every training row."""
        return self.search_rows < self.rows_train

    def tags(self) -> dict[str, str]:
        """The run's tags (`training.*`)."""
        tags = {
            "training.engine": self.engine,
            "training.train_rows": str(self.rows_train),
            "training.search_rows": str(self.search_rows),
            "training.search_families": ",".join(self.search_families),
            "training.search_where": self.search_where,
            "training.fit_rows": str(self.fit_rows),
            "training.fit_where": self.fit_where,
        }
        return tags | ({"training.fit_reason": self.fit_reason[:5000]} if self.fit_reason else {})

    def card_rows(self) -> dict[str, str]:
        """The model card's section "Training: what ran where", label -> text, in order."""
        engine = {
            "dask": "dask: the snapshot's partitions on the Dask cluster (full-data checks, split, sampling)",
            "pandas": "pandas: the whole snapshot in the flow's process",
        }.get(self.engine, self.engine)
        of = f"a sample by id hash of the {self.rows_train:,} training rows" if self.sampled_search else "every one"
        search = (
            f"{', '.join(self.search_families)}: cross-validated on {self.search_rows:,} training rows ({of}), "
            f"in the {self.search_where}"
        )
        every = self.fit_rows >= self.rows_train
        fit = (
            f"the chosen configuration on {'all ' if every else ''}{self.fit_rows:,} "
            f"{'training rows' if every else f'of the {self.rows_train:,} training rows'}, in the {self.fit_where}"
        )
        rows = {"Engine": engine, "Model search": search, "Final fit": fit}
        return rows | ({"Final fit, why": self.fit_reason} if self.fit_reason else {})
