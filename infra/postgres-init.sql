-- Prefect uses the default database `prefect`; MLflow gets its own.
CREATE DATABASE mlflow OWNER mlops;
