# The two commands the README promises: `make demo` runs the main job on the embedded default,
# `make test` runs the tests. Both do all set-up first (system packages, virtualenv, Python packages).
PYTHON ?= python3
VENV ?= .venv
# pip's arguments for PyTorch: the CUDA build this machine's NVIDIA driver runs, else the CPU build (from local
# disk where it lies there); cluster/torch_build.py decides. Set TORCH_SPEC to choose another.
TORCH_SPEC ?= $(shell $(PYTHON) cluster/torch_build.py)
SYSTEM_PACKAGES := pkg-config libopencv-dev libturbojpeg0-dev dataset-fashion-mnist
# Only the tests need these: MLflow's UI rendered in Debian's headless Chromium (not on cluster images).
TEST_SYSTEM_PACKAGES := chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
STAMP := $(VENV)/.satscale-installed

.PHONY: setup system-packages test-system-packages demo test clean

setup: system-packages $(STAMP)

# FFCV builds from source against Debian's OpenCV and libjpeg-turbo; the bundled real dataset is
# Debian's Fashion-MNIST. Installed only when missing.
install-missing = missing=$$(for p in $(1); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q "install ok installed" || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing system packages:" $$missing; \
		$(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing g++ >/dev/null; \
	fi

system-packages:
	@$(call install-missing,$(SYSTEM_PACKAGES))

test-system-packages:
	@$(call install-missing,$(TEST_SYSTEM_PACKAGES))

$(STAMP): pyproject.toml
	[ -x $(VENV)/bin/python ] || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	@[ -n "$(TORCH_SPEC)" ] || { echo "make: no PyTorch build for this machine (above); set TORCH_SPEC"; exit 2; }
	$(VENV)/bin/python -m pip install -q $(TORCH_SPEC)
	$(VENV)/bin/python -m pip install -q -e ".[dev]"
	# AutoAttack for orchestrator/evaluate_study.py: torchattacks' metadata asks for torchvision (which fails
	# beside this torch build) but its code never imports it.
	$(VENV)/bin/python -m pip install -q --no-deps "torchattacks==3.5.1"
	touch $(STAMP)

demo: setup
	$(VENV)/bin/python orchestrator/scale_study.py $(ARGS)

test: setup test-system-packages
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
