"""sftcurate: pick the most informative subset of an SFT data set, fine-tune on it, and prove the gain."""
import infra  # noqa: F401  (environment defaults before Prefect/MLflow are imported)

__version__ = "0.1.0"
