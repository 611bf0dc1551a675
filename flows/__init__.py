"""Prefect flows: they wire tasks and handle state."""
