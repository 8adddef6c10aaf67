"""Infrastructure: settings, artifact store, tracking, model resolution, task runners, local services.

Importing this package applies the offline/quiet environment defaults before Prefect or MLflow are imported.
"""
from sftcurate.infra.env import apply_environment_defaults

apply_environment_defaults()
