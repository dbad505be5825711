# The two commands of the README. Both set up .venv first (scripts/setup.sh, idempotent).
export HF_HUB_OFFLINE ?= 1
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export MLFLOW_DISABLE_TELEMETRY ?= true
export DVC_NO_ANALYTICS ?= 1
export PATH := $(CURDIR)/.venv/bin:$(PATH)

.PHONY: setup run test test-fast

setup:
	@bash scripts/setup.sh

# The main job on embedded defaults: DVC data preparation -> Optuna search -> final training ->
# evaluation -> MLflow registration, LAMA on SmolLM2-135M with a small budget (params/flow.yaml).
run: setup
	python -m flows.run lama

# The full suite: what CI runs (.ci/run).
test: setup
	python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

# The unit tier for the edit loop: no servers, no real weights, no CLI trainings (about 80 s on 2 cores).
test-fast: setup
	python -m pytest -q -p no:cacheprovider -m "not slow and not services and not gpu" $(PYTEST_ARGS)
