"""The registered prompt as MLflow "models from code": MLflow executes this file when it logs and when it
loads the model (no pickle). `model_config` carries the template's input fields, so the request rows'
type hint (and with it the model's signature and MLflow's input validation) names them, and refuses any other
field; the answering, and the limits of what may be asked, are components.mlops.serving.PromptPredictor's."""
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.models import ModelConfig

from components.mlops.serving import Answer, InvalidQuery, PromptPredictor, query_type

Query = query_type(ModelConfig().get("fields"))


class PromptModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        self.predictor = PromptPredictor(context.artifacts["prompt"])

    def predict(self, context, model_input: list[Query], params: dict[str, Any] | None = None) -> list[Answer]:
        """Rows outside the limits (serving.PromptPredictor.check: empty or too long text, top_k out of range)
        are an INVALID_PARAMETER_VALUE, which `mlflow models serve` answers with a 400 and this message."""
        rows = [row.model_dump() if isinstance(row, Query) else dict(row) for row in model_input]
        try:
            return self.predictor.predict(rows, top_k=(params or {}).get("top_k", 5))
        except InvalidQuery as error:
            raise MlflowException.invalid_parameter_value(str(error)) from None


mlflow.models.set_model(PromptModel())
