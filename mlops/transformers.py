"""Where `QuantileClipper` lived before it moved to `core.transformers`.

Models registered before the move were saved (skops) with this module path; loading them imports it.
"""

from core.transformers import QuantileClipper

__all__ = ["QuantileClipper"]
