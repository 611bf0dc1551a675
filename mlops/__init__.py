"""Settings, clients, local stack, data generator and CLI of prefect-mlops."""
