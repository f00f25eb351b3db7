# Set-up and entry points. `make demo` and `make test` create .venv and install what is missing.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install demo test lint bench parity clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# torch first, from TORCH_SPEC (CI: the local CPU wheel), so that the project's torch requirement is
# already met and no CUDA build is pulled in. torchvision is never installed.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	@! $(PY) -m pip show -q torchvision 2>/dev/null || (echo "torchvision got installed; it breaks transformers on CPU torch" && exit 1)
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/reward-align demo --output-dir outputs/demo

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check reward_plugins alignment tests examples

bench: $(STAMP)
	$(PY) examples/benchmarks/score_throughput.py

# Release check: our rewards against the official packages (hpsv2, image-reward, torchmetrics, transformers
# 4.57/4.46, OpenAI clip), each in its own venv under .parity/ (never .venv: they need torchvision), on the
# same random official-format checkpoints and PNGs. Needs PyPI and ../shared/data; see README "Parity".
parity: $(STAMP)
	bash parity/build_envs.sh
	$(PY) parity/run.py

clean:
	rm -rf $(VENV) outputs
