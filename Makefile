# The README's two commands. Each creates .venv and installs the package when needed.
PYTHON ?= python3
VENV := .venv
WORKDIR ?= runs/default

# What running needs; the tests add the [dev] extra (TensorFlow among it) on top.
$(VENV)/installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e .
	touch $@

# The tests also run the benchmark's PyTorch peer: a CPU build of torch, never a CUDA one
# (from the package index when it serves one, else from PyTorch's CPU index).
$(VENV)/installed-dev: $(VENV)/installed
	$(VENV)/bin/pip install --quiet -e ".[dev]"
	$(VENV)/bin/pip install --quiet "torch==2.13.0+cpu" || \
	  $(VENV)/bin/pip install --quiet "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu
	touch $@

.PHONY: run test
run: $(VENV)/installed  ## Train configs/default.py on MNIST; prints the test accuracy.
	$(VENV)/bin/python -m convnet.main --config configs/default.py --workdir $(WORKDIR)

# Test files run in parallel processes (a file's tests share one process and its trained
# fixtures); each process sees 2 fake CPU devices.
test: $(VENV)/installed-dev  ## The test suite (offline; 2 fake CPU devices).
	$(VENV)/bin/python -m pytest -q -n auto --maxprocesses 4 --dist loadfile --durations=10
