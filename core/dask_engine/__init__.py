"""The Dask engine's pure parts: the engine choice, the full-data checks, the split and the model.

`choice` picks the engine for a snapshot, `checks` summarises partitions and merges the summaries into
failures worded like Great Expectations', `split` defines the frozen holdout per partition and what the
flow's process keeps of it, `model` is the fixed encoding plus LightGBM as one scikit-learn pipeline.
The cluster runs them through the top-level `dask_engine` package; nothing here touches a cluster or I/O.
"""
