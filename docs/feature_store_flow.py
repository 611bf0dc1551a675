"""Draw docs/images/feature-store-flow.png, the feature store's data flow (run: python docs/feature_store_flow.py)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.patches import FancyBboxPatch

BOXES = {
    "generator": (0.02, 0.62, "mlops data generate\napplications + applicant\nevent history"),
    "offline": (0.27, 0.62, "offline store (S3)\nfeatures/applicant_history/\nhistory.parquet\n+ registry.db"),
    "join": (0.52, 0.62, "training flow\nget_historical_features\nas of each row's time\n(rows in/out counted)"),
    "model": (0.77, 0.62, "MLflow model version\ntag feature_service"),
    "materialize": (0.27, 0.14, "features flow\n(daily 02:00, or Run)\nmaterialize"),
    "online": (0.52, 0.14, "online store\nSQLite (local)\nRedis (Compose)"),
    "serving": (0.77, 0.14, "serving API\nrecord: id + request fields\nlookup by id, 422 if unknown"),
}
ARROWS = [
    ("generator", "offline"),
    ("offline", "join"),
    ("join", "model"),
    ("offline", "materialize"),
    ("materialize", "online"),
    ("online", "serving"),
    ("model", "serving"),
]
W, H = 0.2, 0.25


def draw(path: Path) -> None:
    """Boxes and arrows, saved as a PNG."""
    fig, ax = plt.subplots(figsize=(12, 5))
    ax.set_axis_off()
    for x, y, text in BOXES.values():
        ax.add_patch(FancyBboxPatch((x, y), W, H, boxstyle="round,pad=0.01", fc="#eef4fb", ec="#2b5d8a"))
        ax.text(x + W / 2, y + H / 2, text, ha="center", va="center", fontsize=9)
    for a, b in ARROWS:
        (xa, ya, _), (xb, yb, _) = BOXES[a], BOXES[b]
        start = (xa + W, ya + H / 2) if ya == yb else (xa + W / 2, ya)
        end = (xb, yb + H / 2) if ya == yb else (xb + W / 2, yb + H)
        ax.annotate("", xy=end, xytext=start, arrowprops={"arrowstyle": "->", "color": "#2b5d8a", "lw": 1.5})
    ax.set_title("Feature store: one definition for training (point-in-time, offline) and serving (online)")
    fig.savefig(path, dpi=110, bbox_inches="tight")


if __name__ == "__main__":
    draw(Path(__file__).resolve().parent / "images" / "feature-store-flow.png")
