# The two set-up commands of the README: `make demo` and `make test`.
# Both create .venv on first use. TORCH_SPEC picks the torch wheel (default: the CPU build
# that lies on this machine's disk, so no multi-GB CUDA wheel is pulled on a CPU machine).
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
PYTHON ?= python3

.PHONY: demo test bench lint clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	# the test extras, the demo and report extras (scikit-learn, matplotlib), and the
	# transformers / peft extras (HF tests on tiny configs, the transformer demo; CPU torch kept)
	$(PY) -m pip install -q -e ".[test,demo,report,transformers,peft]"
	# reference packages for the parity tests, without their own (CUDA) torch requirement
	$(PY) -m pip install -q --no-deps concept-erasure==0.2.4 captum==0.9.0 \
		kronfluence==1.0.1 accelerate==1.15.0 einops==0.8.2 einconv==0.1.0 \
		opt-einsum==3.4.0 safetensors==0.8.0
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/lightning-memo demo

test: $(VENV)/.installed
	$(PY) -m pytest -q -p no:cacheprovider

bench: $(VENV)/.installed
	$(PY) benchmarks/bench_psmi.py
	$(PY) benchmarks/bench_monitor_overhead.py
	$(PY) benchmarks/bench_leace.py
	$(PY) benchmarks/bench_tracin.py
	$(PY) benchmarks/bench_influence.py
	$(PY) benchmarks/bench_flipped.py
	$(PY) benchmarks/bench_scale.py
	$(PY) benchmarks/bench_monitor_defaults.py
	$(PY) benchmarks/bench_memorization.py
	$(PY) benchmarks/bench_finetune_speed.py --context

lint: $(VENV)/.installed
	$(PY) -m pip install -q ruff
	$(VENV)/bin/ruff check lightning_memo tests benchmarks examples
	$(VENV)/bin/ruff format --check lightning_memo tests benchmarks examples

clean:
	rm -rf $(VENV) lightning_logs build *.egg-info
