"""Pipeline stages as typed functions and Prefect tasks."""
