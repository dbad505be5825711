"""The registered prompt bank as MLflow "models from code" (no pickle): rows name their task and may mix tasks;
`model_config` carries every field the bank's templates read, so the request rows' type hint (the model's
signature) names them. The answering and the limits of a request are components.mlops.bank.BankPredictor's."""
from typing import Any, Optional

import mlflow
from mlflow.models import ModelConfig
from pydantic import ConfigDict, create_model

from components.mlops.bank import BankPredictor
from components.mlops.serving import Answer, answer_request

# each field is optional here: which ones a row needs depends on its task (BankPredictor names a missing one)
Query = create_model("BankQuery", __config__=ConfigDict(extra="forbid"), task=(str, ...),
                     **{name: (Optional[str], None) for name in ModelConfig().get("fields")})


class BankModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        self.predictor = BankPredictor(context.artifacts["bank"])

    def predict(self, context, model_input: list[Query], params: dict[str, Any] | None = None) -> list[Answer]:
        """An unknown task or a row outside its prompt's limits gets a 400 naming it."""
        return answer_request(self.predictor, model_input, params)


mlflow.models.set_model(BankModel())
