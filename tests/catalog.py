"""Test helpers: a model of a test's own in the catalog, and its deployments (`training/<model>`, ...)."""

from __future__ import annotations

from typing import Any

import yaml


def put_model(settings: Any, raw: dict[str, Any], **operations: Any) -> Any:
    """Store the config `raw` (its `operations` updated with `operations`) as a catalog entry; returns the entry.

    Stored directly (`adapters.catalog.put_entry`), without `mlops models add`'s checks of its sources: a
    test's data may be written later. Replaces an entry of the same model.
    """
    from adapters.catalog import put_entry
    from core.data.dataset import parse_dataset_config

    raw = dict(raw) | {"operations": (raw.get("operations") or {}) | operations}
    text = yaml.safe_dump(raw, sort_keys=False)
    config = parse_dataset_config(text, f"test config of {raw['model_name']}")
    return put_entry(settings, config, text, replace=True)


def deploy_model(settings: Any, raw: dict[str, Any], **operations: Any) -> dict[str, str]:
    """Put the model in the catalog and deploy it alone (other models' deployments are left alone).

    Returns flow name -> deployment id of this model's deployments (`training`, `monitoring`, `rollback`,
    `scoring` when it has a scoring source), and `features`.
    """
    from deployments.deploy import deploy_all

    entry = put_model(settings, raw, **operations)
    ids = deploy_all(work_pool=settings.work_pool, entries=[entry])
    return {name.split("/")[0]: deployment_id for name, deployment_id in ids.items()}
