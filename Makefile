# Shortcuts for the scripts the README names.
.PHONY: demo test bench clean
demo:
	scripts/demo.sh
test:
	scripts/test.sh
bench:
	scripts/demo.sh >/dev/null && .venv/bin/pip install -q '.[isal]' && .venv/bin/python benchmarks/run.py
clean:
	rm -rf .venv out .tox build *.egg-info
