"""The registered prompt as MLflow "models from code": MLflow executes this file when it logs and when it
loads the model (no pickle). `model_config` carries the template's input fields, so the request rows'
type hint (and with it the model's signature and MLflow's input validation) names them; the answering
itself is components.mlops.serving.PromptPredictor."""
from typing import Any

import mlflow
from mlflow.models import ModelConfig

from components.mlops.serving import Answer, PromptPredictor, query_type

Query = query_type(ModelConfig().get("fields"))


class PromptModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        self.predictor = PromptPredictor(context.artifacts["prompt"])

    def predict(self, context, model_input: list[Query], params: dict[str, Any] | None = None) -> list[Answer]:
        rows = [row.model_dump() if isinstance(row, Query) else dict(row) for row in model_input]
        return self.predictor.predict(rows, top_k=int((params or {}).get("top_k", 5)))


mlflow.models.set_model(PromptModel())
