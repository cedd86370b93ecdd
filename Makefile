PROMPT ?= Write a Python function that returns the n-th Fibonacci number.

.PHONY: setup demo test lint bench proto

setup:
	bash scripts/setup.sh

demo: setup
	tandem generate "$(PROMPT)"

test: setup
	python -m pytest -q

lint:
	ruff check tandem tests bench cluster workers scripts

bench: setup
	python bench/decode.py

proto:
	python scripts/gen_proto.py
