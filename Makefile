# Everything a fresh machine needs: `make demo` and `make test` create .venv and install into it.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# torch is pinned so pip takes the CPU wheel rather than a multi-GB CUDA build.
TORCH  := torch==2.13.0
DEMO   ?= demo-out

.PHONY: venv install install-dev demo test test-slow bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(VENV)/.installed: $(PY) pyproject.toml
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e '.[llama]'
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed pyproject.toml
	$(PIP) install -q $(TORCH) -e '.[dev]'
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

demo: install
	rm -rf $(DEMO) && mkdir -p $(DEMO)
	$(VENV)/bin/grokquant synth $(DEMO)/grok2-tiny --preset tiny
	$(VENV)/bin/grokquant inspect $(DEMO)/grok2-tiny
	$(VENV)/bin/grokquant run $(DEMO)/grok2-tiny --prompt "The quick brown fox" --max-new-tokens 16
	$(VENV)/bin/grokquant convert $(DEMO)/grok2-tiny -o $(DEMO)/grok2-tiny-q4_k_m.gguf --recipe q4_k_m
	$(VENV)/bin/grokquant run $(DEMO)/grok2-tiny-q4_k_m.gguf --engine llama.cpp --prompt "The quick brown fox" --max-new-tokens 16

test: install-dev
	$(PY) -m pytest -q

test-slow: install-dev
	$(PY) -m pytest -q -m slow

bench: install-dev
	$(PY) benchmarks/memory.py
	$(PY) benchmarks/gguf_convert.py

clean:
	rm -rf $(VENV) $(DEMO) .pytest_cache
