"""MLflow "models from code" entry point: MLflow copies this file into a logged model and runs
it on load, so the model object is built from code rather than unpickled."""

import mlflow

from serving.mlflow_model import OnnxScorerModel

mlflow.models.set_model(OnnxScorerModel())
