"""Feature store benchmark: online lookup latency inside the serving API's code, and end-to-end requests with
and without the lookup. One run, one client, one record per request.

Needs the stack running, a `credit-risk-history` champion (`mlops train --config credit-risk-history`) and a
materialized store (`mlops features materialize`). Measures:

- the lookup in-process: `serving.online_features.OnlineFeatures` filling one id-only record (the code path
  the API runs), N times;
- `/predict` end to end from one sequential client against `mlops serve --model credit-risk-history`: the
  same records sent with their store features (no lookup) and with only the id + request fields (lookup),
  interleaved so both see the same load;
- the API's own `mlops_serving_feature_lookup_seconds` histogram: its mean (sum / count) over the run.

    python -m bench.features [--requests 300]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
from prometheus_client import CollectorRegistry

from adapters.clients import S3Location, s3_client
from adapters.feature_store import feature_store, online_features
from adapters.settings import get_settings
from core.data.dataset import load_local_dataset_config
from mlops.stack import client_env, running
from serving.online_features import OnlineFeatures
from tests.ports import free_port

MODEL = "credit-risk-history"
SERVICE = "credit_risk_history"


def _pct(values: list[float]) -> dict[str, float]:
    a = np.asarray(values) * 1e3
    return {"p50_ms": round(float(np.percentile(a, 50)), 3), "p99_ms": round(float(np.percentile(a, 99)), 3)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=300)
    args = parser.parse_args()
    settings = get_settings()
    config = load_local_dataset_config(MODEL)
    location = S3Location.parse(config.source).child("month=2025-12/part-0.parquet")
    frame = pd.read_parquet(
        io.BytesIO(s3_client(settings).get_object(Bucket=location.bucket, Key=location.key)["Body"].read())
    )
    store = feature_store(settings)
    ids = frame["application_id"].head(args.requests * 2).tolist()
    found = pd.DataFrame(online_features(store, SERVICE, ids))
    known = found[found[config.store_features].notna().any(axis=1)].head(args.requests)
    request_fields = [f for f in config.feature_names if f not in config.store_features]
    base = frame.set_index("application_id").loc[known["application_id"]].reset_index()
    slim = json.loads(base[["application_id", *request_fields]].to_json(orient="records"))
    full = [r | {c: known.iloc[i][c] for c in config.store_features} for i, r in enumerate(slim)]
    full = json.loads(json.dumps(full, default=float))

    online = OnlineFeatures(settings, CollectorRegistry())
    online._fill(SERVICE, "application_id", "records", [slim[0]])  # builds the store and reads the registry once
    in_process = []
    for record in slim:
        started = time.perf_counter()
        online._fill(SERVICE, "application_id", "records", [record])
        in_process.append(time.perf_counter() - started)

    port = free_port()
    command = [str(Path(sys.executable).parent / "mlops"), "serve", "--port", str(port), "--model", MODEL]
    env = os.environ | client_env(settings)
    url = f"http://127.0.0.1:{port}"
    results: dict[str, object] = {"requests": len(slim), "lookup_in_process": _pct(in_process)}
    with running(command, f"{url}/health", env, Path("/tmp") / f"bench-features-{port}.log"), httpx.Client() as client:
        deadline = time.time() + 120
        while client.get(f"{url}/ready").status_code != 200 and time.time() < deadline:
            time.sleep(0.5)
        for record in slim[:20] + full[:20]:  # warm-up
            assert client.post(f"{url}/predict", json={"records": [record]}, timeout=30).status_code == 200
        times: dict[str, list[float]] = {"with_features_no_lookup": [], "id_only_lookup": []}
        for with_features, id_only in zip(full, slim, strict=True):  # interleaved: the same load on both
            for name, record in (("with_features_no_lookup", with_features), ("id_only_lookup", id_only)):
                started = time.perf_counter()
                answer = client.post(f"{url}/predict", json={"records": [record]}, timeout=30)
                times[name].append(time.perf_counter() - started)
                assert answer.status_code == 200, answer.text
        results |= {name: _pct(values) for name, values in times.items()}
        metrics = client.get(f"{url}/metrics").text
    values = {
        line.split()[0]: float(line.split()[1])
        for line in metrics.splitlines()
        if line.startswith(("mlops_serving_feature_lookup_seconds_sum", "mlops_serving_feature_lookup_seconds_count"))
    }
    count = values["mlops_serving_feature_lookup_seconds_count"]
    results["lookup_in_api_mean_ms"] = round(1e3 * values["mlops_serving_feature_lookup_seconds_sum"] / count, 3)
    results["lookups_in_api"] = count
    buckets = sorted(
        (float(line.split('le="')[1].split('"')[0]), float(line.split()[-1]))
        for line in metrics.splitlines()
        if line.startswith("mlops_serving_feature_lookup_seconds_bucket")
    )
    for q in (0.5, 0.99):  # the histogram's bucket bound holding the quantile (what Prometheus can tell)
        bound = next(le for le, cumulative in buckets if cumulative >= q * count)
        results[f"lookup_in_api_p{int(q * 100)}_ms_at_most"] = round(bound * 1e3, 3)
    print(json.dumps(results, indent=2))
    out = Path(__file__).parent / "results" / "features.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
