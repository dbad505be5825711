# CUDA runtime image for ptuning: the flows, the CLI and a Prefect worker/serve process.
#   docker build -t ptuning .
#   docker run --gpus all -e PREFECT_API_URL=http://prefect:4200/api -e MLFLOW_TRACKING_URI=http://mlflow:5000 ptuning
FROM pytorch/pytorch:2.7.1-cuda12.6-cudnn9-runtime

ENV PYTHONUNBUFFERED=1 \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    MLFLOW_DISABLE_TELEMETRY=true \
    DVC_NO_ANALYTICS=1 \
    CUBLAS_WORKSPACE_CONFIG=:4096:8 \
    PTUNING_DATA_MIRROR=/data/mirror \
    PTUNING_MODEL_CACHE=/cache/models

RUN apt-get update && apt-get install -y --no-install-recommends git && rm -rf /var/lib/apt/lists/*
WORKDIR /app
# The image's CUDA torch satisfies the project's torch range, so pip keeps it.
COPY pyproject.toml README.md ./
COPY components ./components
COPY flows ./flows
RUN pip install --no-cache-dir -e .
COPY params ./params
COPY dvc.yaml prefect.yaml ./
COPY .dvc/config ./.dvc/config
# DVC needs a git repository; data and models come from mounted volumes (/data/mirror, /cache/models).
RUN git init -q

CMD ["python", "-m", "flows.serve"]
