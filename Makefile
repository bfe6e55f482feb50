# Everything a fresh machine needs: `make demo` and `make test` create .venv and install into it.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# torch is pinned so pip takes the CPU wheel rather than a multi-GB CUDA build.
TORCH  := torch==2.13.0
DEMO   ?= demo-out

.PHONY: venv install install-dev demo test test-slow test-interop test-llama-avx2 bench clean

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
	$(VENV)/bin/grokquant eval $(DEMO)/grok2-tiny $(DEMO)/grok2-tiny-q4_k_m.gguf --baseline $(DEMO)/grok2-tiny --engine both --ctx 256 --chunks 8

test: install-dev
	$(PY) -m pytest -q

test-slow: install-dev
	$(PY) -m pytest -q -m slow

# auto-gptq's own QuantLinear reads our GPTQ artifacts (tests/test_gptq_interop.py, skipped elsewhere). A venv
# of its own: auto-gptq 0.7.1 wants old transformers/peft/datasets. BUILD_CUDA_EXT=0 keeps an sdist build
# (Pythons without a wheel) CPU-only; its setup.py imports torch, hence --no-build-isolation.
INTEROP := .venv-interop

$(INTEROP)/.installed: pyproject.toml
	$(PYTHON) -m venv $(INTEROP)
	$(INTEROP)/bin/python -m pip install -q --upgrade pip setuptools wheel
	$(INTEROP)/bin/python -m pip install -q $(TORCH)
	BUILD_CUDA_EXT=0 $(INTEROP)/bin/python -m pip install -q --no-build-isolation auto-gptq==0.7.1 \
		'transformers<4.46' 'peft<0.13' 'datasets<3'
	$(INTEROP)/bin/python -m pip install -q -e . pytest
	touch $@

test-interop: $(INTEROP)/.installed
	$(INTEROP)/bin/python -m pytest -q tests/test_gptq_interop.py -p no:cacheprovider

# The suite against llama.cpp compiled for another CPU feature set: AVX2 only (no AVX-512, VNNI or AMX),
# as a user's older machine would build it. llama-cpp-python compiles for the CPU it is built on, and pip
# would hand back its cached native wheel whatever CMAKE_ARGS says, hence --no-cache-dir. On PYTHONPATH it
# takes the place of the venv's build for the tests and for the child processes they start.
LLAMA_AVX2 := .venv-llama-avx2
LLAMA_AVX2_FLAGS := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON \
	-DGGML_AVX512=OFF -DGGML_AVX_VNNI=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF

$(LLAMA_AVX2)/.installed: $(VENV)/.installed-dev
	CMAKE_ARGS="$(LLAMA_AVX2_FLAGS)" $(PIP) install -q --no-cache-dir --no-deps --target $(LLAMA_AVX2) \
		llama-cpp-python==0.3.36
	touch $@

test-llama-avx2: $(LLAMA_AVX2)/.installed
	PYTHONPATH=$(CURDIR)/$(LLAMA_AVX2) $(PY) -c "import llama_cpp; print(llama_cpp.__file__, \
		llama_cpp.llama_print_system_info().decode())"
	PYTHONPATH=$(CURDIR)/$(LLAMA_AVX2) $(PY) -m pytest -q

bench: install-dev
	$(PY) benchmarks/memory.py
	$(PY) benchmarks/gguf_convert.py

clean:
	rm -rf $(VENV) $(INTEROP) $(LLAMA_AVX2) $(DEMO) .pytest_cache
