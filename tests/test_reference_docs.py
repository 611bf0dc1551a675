"""The generated configuration reference says what the code declares: every setting and config field is in it."""

from __future__ import annotations

from adapters.settings import Settings
from core.data.dataset import DatasetConfig
from core.data.operations import Operations
from mlops.reference import configuration_reference, env_names


def test_every_setting_is_listed_with_its_environment_variable_and_description():
    page = configuration_reference()
    for name, field in Settings.model_fields.items():
        variable = env_names(name, field, "MLOPS_")
        assert variable in page, name
        if field.description:
            assert " ".join(field.description.split()).replace("|", "\\|") in page, name


def test_every_dataset_config_and_operations_field_is_listed():
    page = configuration_reference()
    for model in (DatasetConfig, Operations):
        for name in model.model_fields:
            assert f"| `{name}` |" in page, (model.__name__, name)


def test_the_ecosystems_own_variables_are_named_as_they_are():
    page = configuration_reference()
    for variable in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL_S3", "MLFLOW_TRACKING_URI"):
        assert f"`{variable}`" in page
    assert "test-secret" not in page and "(secret)" in page
