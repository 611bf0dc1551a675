"""The prediction log's converter process: the same Parquet as converting in the serving process, and no
process left behind when the serving process is SIGKILLed (no servers needed: the spool is a local folder)."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd

from tests.waiting import wait_for

SCRIPT = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import numpy as np
    from adapters.settings import Settings
    from adapters.prediction_spool import CONVERTER
    from serving.prediction_log import ScoredBatch, SpooledPredictionLog

    log = SpooledPredictionLog(Settings(state_dir=Path(sys.argv[1])), "m")
    log.spool.open()
    columns = {"age": np.array([30.0, np.nan, 41.5]), "region": np.array(["north", None, "\\x00null"], dtype=object)}
    for i in range(50):
        log.record(ScoredBatch(columns, np.full((3, 2), 0.5), [0, 1], [f"r{i}"] * 3, "7", ["a", None, "c"], [0, 1, 2]))
    log.spool.roll()
    [segment] = log.spool.closed_segments()
    body, rows, torn = log.uploader.convert(segment)
    Path(sys.argv[2]).write_bytes(body)
    print(rows, torn, segment, flush=True)
    [child] = CONVERTER.pool._processes  # the converter's pid, for the test to watch
    print(child, flush=True)
    time.sleep(600)
    """
)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


def test_converter_writes_what_the_serving_process_would_and_dies_with_it(tmp_path):
    from adapters.prediction_spool import segment_parquet

    # Given a serving-like process that spooled 150 records and had its segment converted by the converter
    out = tmp_path / "converted.parquet"
    process = subprocess.Popen(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "state"), str(out)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
        start_new_session=True,
    )
    try:
        rows, torn, segment = process.stdout.readline().split()
        converter = int(process.stdout.readline())
        # then the converter's Parquet holds the same table as converting in this process
        assert (int(rows), int(torn)) == (150, 0) and converter != process.pid
        here, rows_here, _ = segment_parquet(Path(segment))
        pd.testing.assert_frame_equal(pd.read_parquet(out), pd.read_parquet(io.BytesIO(here)))
        assert rows_here == 150 and len(pd.read_parquet(out)) == 150
        assert _alive(converter)
        # when the serving process is SIGKILLed (only it: a killed uvicorn worker, not its process group)
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
        killed = time.monotonic()
        # then its converter exits too, within seconds
        wait_for(lambda: not _alive(converter), 15, "the converter process to exit after its parent", interval=0.2)
        assert time.monotonic() - killed < 15
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
