# Shortcuts for the scripts the README names.
.PHONY: demo test bench clean tool-image
demo:
	scripts/demo.sh
test:
	scripts/test.sh
bench:
	scripts/demo.sh >/dev/null && .venv/bin/pip install -q '.[isal]' && .venv/bin/python benchmarks/run.py
# The tool's container image (Dockerfile), in the daemon DOCKER_HOST names.
tool-image:
	scripts/build-tool-image.py
clean:
	rm -rf .venv out .tox build *.egg-info
