"""Judging a candidate on the frozen holdout.

Bootstrap intervals, slices, fairness, the review and the promotion decision.
"""
