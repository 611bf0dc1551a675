"""Dataset configs and snapshots.

The config and its operations, column kinds, inferring a config, validation, the frozen split, features, the
feature store's point-in-time join, fingerprints and the synthetic data.
"""
