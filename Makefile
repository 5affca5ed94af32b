# The two set-up commands (each creates and reuses .venv, installing what it needs):
#   make demo    run the whole pipeline on the embedded default
#   make test    run the test suite
.PHONY: demo test setup lint clean

setup:
	@scripts/bootstrap

demo: setup
	@scripts/demo

test: setup
	.venv/bin/python -m pytest -q

lint: setup
	.venv/bin/ruff check rlhf_core flows tests benchmarks

clean:
	rm -rf outputs .prefect mlflow.db mlruns
