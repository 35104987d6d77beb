#!/bin/sh
# The install step of the container image (Dockerfile), in a clean venv from a built wheel.
# tests/test_container.py runs this same script on the wheel built from the checkout.
#
#   container/install.sh VENV WHEEL [EXTRAS]      EXTRAS default: service; PYTHON default python3
set -eu
venv=$1
wheel=$2
extras=${3:-service}
"${PYTHON:-python3}" -m venv "$venv"
# Compiled .pyc files are kept: the image runs as a user that cannot write them, and they save
# start-up time. (pip's cache stays in the build stage; only the venv reaches the final image.)
"$venv/bin/python" -m pip install --disable-pip-version-check --quiet "$wheel[$extras]"
# No build tools or installer at run time: setuptools (which venvs of Python < 3.12 get) and pip go.
"$venv/bin/python" -m pip uninstall --yes --quiet setuptools 2>/dev/null || true
"$venv/bin/python" -m pip uninstall --yes --quiet pip
"$venv/bin/fhir-leuko" --version
