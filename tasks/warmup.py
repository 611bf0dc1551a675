"""The libraries a training run needs only after its search, imported in the background while it reads data.

Importing them took about 5 s of a 100k-row run's fixed cost, on the run's critical path, each at its first
use: Great Expectations 2.0 s, skops.io 1.2-2.0 s (it imports scikit-learn's testing helpers, pytest among
them), MLflow 1.0 s, ONNX 0.6-0.9 s, prefect-dask 0.2-0.4 s. A daemon thread imports them at the start of the
flow, while the flow's own thread mostly waits on S3 and the Prefect and MLflow APIs; Python's import lock
makes a module the flow needs before the thread got to it wait for that one import, never import it twice.
"""

from __future__ import annotations

import importlib
import logging
import threading

log = logging.getLogger(__name__)

# Great Expectations first (validation follows the load); MLflow the flow imports itself at once.
LATER_IMPORTS = (
    "great_expectations",
    "skops.io",
    "onnx",
    "onnxruntime",
    "skl2onnx",
    "prefect_dask",
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
