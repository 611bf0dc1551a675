"""`make demo`'s own commands, on a stack of their own: the bundled model goes through the catalog like any other.

The recipe is read from the Makefile (so the test follows it), its `mlops` lines run in order against a
private stack on free ports, with smaller data and search (`--rows-per-month`, `--trials`) so the test
stays short; the commands, their order and the path (catalog, deploy, train) are the demo's.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.ports import stack_ports

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
SMALLER = {"generate": ["--rows-per-month", "600", "--no-history"], "train": ["--trials", "1"]}


def demo_commands() -> list[list[str]]:
    """The `demo` recipe's command lines, `$(BIN)/` resolved to this venv."""
    lines = (ROOT / "Makefile").read_text().splitlines()
    start = lines.index(next(line for line in lines if line.startswith("demo:")))
    recipe = []
    for line in lines[start + 1 :]:
        if not line.startswith("\t"):
            break
        recipe.append(shlex.split(line.strip().replace("$(BIN)/", f"{BIN}/")))
    return recipe


def test_the_recipe_adds_the_bundled_model_to_the_catalog_deploys_and_trains_it():
    assert [c[1:3] for c in demo_commands()] == [
        ["stack", "up"],
        ["data", "generate"],
        ["models", "add"],
        ["deploy"],
        ["train", "--model"],
    ]


def test_demo_commands_end_with_a_served_champion(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLOPS_", "PREFECT_API", "MLFLOW_", "AWS_"))}
    env |= stack_ports() | {
        "MLOPS_STATE_DIR": str(tmp_path / "state"),
        "MLOPS_SERVING_WORKERS": "1",
        "MLOPS_DASK_WORKERS": "0",
    }
    serving = int(env["MLOPS_SERVING_PORT"])
    outputs = []
    try:
        for command in demo_commands():
            extra = SMALLER.get(command[1], [])
            result = subprocess.run(
                [*command, *extra], check=False, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900
            )
            assert result.returncode == 0, f"{command}: {result.stdout[-2000:]}{result.stderr[-3000:]}"
            outputs.append(result.stdout)
        # then the model was added to the catalog, deployed, trained and promoted, and the API serves it
        assert "added credit-risk: s3://mlops/catalog/credit-risk.yaml" in outputs[2]
        assert "deployed training/credit-risk:" in outputs[3] and "deployed scoring/credit-risk:" in outputs[3]
        assert "-> PROMOTED" in outputs[4], outputs[4]
        assert f"http://127.0.0.1:{serving}/models/credit-risk" in outputs[4]
        listed = subprocess.run(
            [str(BIN / "mlops"), "models", "list"], check=False, capture_output=True, text=True, env=env, timeout=300
        )
        [row] = [line for line in listed.stdout.splitlines() if line.startswith("credit-risk")]
        assert "v1" in row and "yes (v1)" in row and "completed" in row, listed.stdout
        model = httpx.get(f"http://127.0.0.1:{serving}/models/credit-risk", timeout=10).json()
        assert str(model["version"]) == "1", model
    finally:
        subprocess.run([str(BIN / "mlops"), "stack", "down"], check=False, env=env, timeout=300)
