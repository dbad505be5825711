"""The registered prompt as MLflow "models from code": MLflow executes this file when it logs and when it
loads the model (no pickle). `model_config` carries the request's fields (serving.input_fields), so the request rows'
type hint (and with it the model's signature and MLflow's input validation) names them, and refuses any other
field; the answering, and the limits of what may be asked, are components.mlops.serving.ServedPrompt's."""
from typing import Any

import mlflow
from mlflow.models import ModelConfig

from components.mlops.serving import Answer, PromptPredictor, answer_request, query_type

Query = query_type(ModelConfig().get("fields"))


class PromptModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        self.predictor = PromptPredictor(context.artifacts["prompt"])

    def predict(self, context, model_input: list[Query], params: dict[str, Any] | None = None) -> list[Answer]:
        """Rows outside the limits (serving.ServedPrompt.check: empty or too long text, top_k out of range) get a 400."""
        return answer_request(self.predictor, model_input, params)


mlflow.models.set_model(PromptModel())
