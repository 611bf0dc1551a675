"""The model search.

Model families and their space, cross-validated trials, metrics, explanations and the input signature.
"""
