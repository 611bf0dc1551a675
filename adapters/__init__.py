"""One place each for the outside world: settings, S3, the MLflow registry, Great Expectations, Prefect."""
