"""The Dask engine: big tables worked on partition by partition on a Dask cluster.

Training on a snapshot too big for the flow's process: `snapshots` lists and reads its partitions,
`validation` runs the full-data checks, `split` the frozen holdout, `training` LightGBM's Dask estimator.
Scoring and drift over a partition's Parquet files: `scoring` and `drift`, with the model loaded once per
worker process (`workers`). The pure rules they apply are in `core.dask_engine`; the cluster's address,
clients and S3 options in `adapters.cluster`. Prefect tasks (`tasks/`) call this package; it never
imports an outside system's client (MLflow, boto3, s3fs) itself, only through `adapters`.
"""
