"""`python -m serving`: the same as `mlops serve`."""

from mlops.cli import serve_main

serve_main()
