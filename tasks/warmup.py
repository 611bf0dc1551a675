"""The libraries a training run needs only after its search, imported in a background thread beside the search.

Importing them took about 5 s of a 100k-row run's fixed cost, on the run's critical path, each at its first
use: skops.io 1.2-2.0 s (it imports scikit-learn's testing helpers, pytest among them), MLflow's model flavour
1.0 s, ONNX 0.6-0.9 s. (prefect-dask is not among them: only a search on the cluster uses it, and it imports it
before its first trial.) A daemon thread imports them while the search runs (its trials
spend their time in compiled code). Started at the flow's first line instead, the thread took the GIL from the
steps before the search, which import MLflow and s3fs themselves: on 2026-12-07 at 100k rows the flow's fixed
cost inside the run was 15.0 and 18.7 s that way (2 runs) and 12.0 and 11.1 s with the thread beside the search (2 runs,
bench/results/run_cost_100k_warm_imports_later.md). Python's import lock makes a module the flow needs before
the thread got to it wait for that one import, never import it twice; code that takes a module from `sys.modules`
instead of importing it does not wait (`matplotlib.use` did: `core/modeling/metrics.py`'s `_pyplot`). Great
Expectations is not here: the validation beside the search imports it first.
"""

from __future__ import annotations

import importlib
import logging
import threading

log = logging.getLogger(__name__)

# In the order the steps after the search need them (the flow imports MLflow's client itself at once).
LATER_IMPORTS = (
    "skops.io",
    "onnx",
    "onnxruntime",
    "skl2onnx",
    "mlflow.sklearn",
    "mlflow.models",
    "matplotlib.pyplot",
)


def _import_all(names: tuple[str, ...]) -> None:
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as exc:  # an optional library absent here: the code that needs it says so itself
            log.debug("background import of %s failed: %s", name, exc)


def warm_imports(names: tuple[str, ...] = LATER_IMPORTS) -> threading.Thread:
    """Start importing `names` in a daemon thread; returns it (nothing needs to wait for it)."""
    thread = threading.Thread(target=_import_all, args=(names,), name="warm-imports", daemon=True)
    thread.start()
    return thread
