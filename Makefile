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

.PHONY: setup system-packages test-system-packages demo test clean gpu-check-bundle

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

# What benchmarks/gpu_check.py needs on the lent GPU machine (Python 3.12, torch there; no registry): the
# pure-Python packages the trainers and robustness import, and Fashion-MNIST's test split (4.4 MB). Carry
# $(GPU_CHECK_BUNDLE) with the run; benchmarks/README.md has the command.
GPU_CHECK_BUNDLE := .gpu-check
GPU_CHECK_WHEELS := pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
	typing-extensions==4.16.0 robustness==1.2.1.post2 cox==0.2 dill==0.4.1 tensorboardX==2.6.5
gpu-check-bundle: setup
	rm -rf $(GPU_CHECK_BUNDLE) && mkdir -p $(GPU_CHECK_BUNDLE)/wheels $(GPU_CHECK_BUNDLE)/fashion-mnist
	$(VENV)/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		-d $(GPU_CHECK_BUNDLE)/wheels $(GPU_CHECK_WHEELS)
	cp /usr/share/datasets/fashion-mnist/t10k-* $(GPU_CHECK_BUNDLE)/fashion-mnist/

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
