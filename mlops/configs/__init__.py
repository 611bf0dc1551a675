"""Bundled dataset configs."""
