"""The bare scikit-learn script of bench/run_cost.py: what the training flow does minus everything around it.

Reads the dataset config's Parquet files from S3 into one pandas frame, splits off the same frozen holdout,
runs the same search (the config's own search settings, as `mlops train` uses them: families, trials, folds,
seed; trials one after another in this process) and evaluates the chosen model on the holdout. No Prefect,
no MLflow, no validation, no registry. Prints one line `RESULT {json}` with each phase's seconds.

Usage (bench/run_cost.py runs it in its own process, with the bench stack's S3 in the environment):
`python -m bench.run_cost_bare CONFIG.yaml [--seed 42]`.
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()
    started = time.perf_counter()
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    from adapters.clients import S3Location, s3_client
    from adapters.settings import get_settings
    from adapters.store import list_keys
    from core.data.dataset import parse_dataset_config
    from core.data.split import split_frame
    from core.modeling.metrics import evaluate_on
    from core.modeling.search import SearchSpec, search_models

    phases: dict[str, float] = {"imports": time.perf_counter() - started}
    config = parse_dataset_config(args.config.read_text(), str(args.config))
    spec = SearchSpec.model_validate(config.operations.search)  # what `mlops train` searches without options

    mark = time.perf_counter()
    settings = get_settings()
    source = S3Location.parse(config.source)
    client = s3_client(settings)
    tables = []
    for key in list_keys(settings, source, (".parquet",)):
        body = client.get_object(Bucket=source.bucket, Key=key)["Body"].read()
        tables.append(pq.read_table(io.BytesIO(body)))
        del body
    frame: pd.DataFrame = pa.concat_tables(tables).to_pandas()
    del tables
    phases["read"] = time.perf_counter() - mark

    mark = time.perf_counter()
    split = split_frame(frame, config)
    del frame
    phases["split"] = time.perf_counter() - mark

    mark = time.perf_counter()
    result = search_models(split.train, config, spec, args.seed)  # the trials, then the refit on all training rows
    phases["search_and_refit"] = time.perf_counter() - mark

    mark = time.perf_counter()
    metrics = evaluate_on(result.model, split.holdout, config)
    phases["evaluate"] = time.perf_counter() - mark

    out = {
        "rows_train": len(split.train),
        "rows_holdout": len(split.holdout),
        "search": spec.model_dump(mode="json"),
        "family": result.family,
        "trials": len(result.trials),
        "metrics": {k: round(v, 5) for k, v in metrics.items()},
        "phases_s": {k: round(v, 2) for k, v in phases.items()},
        "in_script_s": round(time.perf_counter() - started, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
