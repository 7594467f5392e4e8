#!/usr/bin/env bash
# Sourced by the device scripts: the carried wheels (.whl: diffusers, importlib_metadata, sageattention) into
# /tmp/site and an editable install (the "paro" backend entry point), unbuffered Python output.
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . > /dev/null 2>&1 || echo "editable install failed"
