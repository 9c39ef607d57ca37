# make demo — set up, then run the Fashion-MNIST demo (compress run examples/fashion_mnist.yaml)
# make test — set up, then ruff and the test suite (what .ci/run calls)
# make test-vision — a second venv with the vision extra, then the tests marked `vision` (torchvision/timm)
# make example-folder — the image-folder example (needs the vision extra: VISION_PY, README "Your model")
VENV ?= .venv
PY := $(VENV)/bin/python
FMNIST ?= /usr/share/datasets/fashion-mnist
FMNIST_FILES := train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo -n)

.PHONY: setup demo test lint fashion-mnist clean setup-vision test-vision example-folder

setup: $(VENV)/.installed
	@$(MAKE) -s fashion-mnist || true

# torch==2.13.0 first: it is a CPU build on disk here, and it satisfies pyproject's range,
# so `pip install -e .` adds no other torch (a bare requirement pulls a multi-GB CUDA build).
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

# Installs Fashion-MNIST with apt when its files are missing and apt is usable.
fashion-mnist:
	@missing=0; for f in $(FMNIST_FILES); do [ -f "$(FMNIST)/$$f" ] || missing=1; done; \
	if [ $$missing = 1 ] && command -v apt-get >/dev/null 2>&1; then \
	  ($(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 || true; \
	fi

demo: setup
	@for f in $(FMNIST_FILES); do [ -f "$(FMNIST)/$$f" ] || { \
	  echo "Fashion-MNIST not found in $(FMNIST): install it with 'apt-get install dataset-fashion-mnist', or put the four IDX .gz files in a folder and run 'make demo FMNIST=/that/folder' (sets data.root)."; exit 1; }; done
	$(VENV)/bin/compress run examples/fashion_mnist.yaml --set data.root=$(FMNIST)

# Fashion-MNIST as 70,000 3x32x32 PNGs in class folders (about a minute), then ResNet-18 ->
# MobileNetV3-small (examples/fashion_mnist_folder.yaml). torchvision is the vision extra: a
# Python with it (torch 2.14.1 + torchvision 0.29.1 + timm + this package) is VISION_PY:
# by default the venv `make setup-vision` makes.
VISION_PY ?= $(VVENV)/bin/python
FOLDER ?= runs/data/fashion_mnist_folder
example-folder:
	@$(VISION_PY) -c "import torchvision" 2>/dev/null || { \
	  echo "$(VISION_PY) cannot import torchvision: run 'make setup-vision' first (README: 'Your model'), or 'make example-folder VISION_PY=/a/python/with/torchvision'."; exit 1; }
	@[ -d "$(FOLDER)/train" ] && [ -d "$(FOLDER)/test" ] || $(VISION_PY) examples/make_image_folder.py $(FOLDER) --root $(FMNIST)
	$(VISION_PY) cli.py run examples/fashion_mnist_folder.yaml --set data.root=$(abspath $(FOLDER))

test: setup
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

# The vision extra in a venv of its own: PyPI's torchvision 0.29.1 imports only beside torch
# 2.14.1 (a CUDA build, ~5.5 GB, that runs on the CPU), while the main venv keeps the CPU torch
# 2.13.0. Both venvs install this checkout in editable mode.
VVENV ?= .venv-vision
VPY := $(VVENV)/bin/python

setup-vision: $(VVENV)/.installed

$(VVENV)/.installed: pyproject.toml
	python3 -m venv $(VVENV)
	$(VPY) -m pip install -q torch==2.14.1 torchvision==0.29.1 timm
	$(VPY) -m pip install -q -e ".[vision,dev]"
	touch $@

test-vision: setup-vision
	$(VPY) -m pytest -q -m vision

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf runs .pytest_cache
