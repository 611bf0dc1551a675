"""Monitoring.

Drift statistics and verdicts, decay, the reports, the prediction log's layout and the retraining rule.
"""
