"""``tandem generate`` as a user runs it: a real subprocess, clear errors and no tracebacks."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tandem.engine import Engine, Request
from tandem.sampling import SamplingParams


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tandem.cli", "generate", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize(
    "args,message",
    [
        (["   "], "prompt is empty"),
        (["hi", "--temperature", "-1"], "temperature must be >= 0"),
        (["hi", "--top-p", "0"], "top_p must be in (0, 1]"),
        (["hi", "--top-p", "1.5"], "top_p must be in (0, 1]"),
        (["hi", "--max-tokens", "0"], "max_tokens must be > 0"),
        (["hi", "--model", "/no/such/model"], "does not exist"),
        (["hi", "--model", __file__], "neither a model folder nor a GGUF file"),
        (["hi", "--drafter", "dspark", "--tree", "2,3,4", "--chain"], "--tree and --chain exclude each other"),
        (["hi", "--drafter", "dspark:2,3,4", "--chain"], "already has a tree shape"),
        (["hi", "--drafter", "suffix", "--tree", "2,3,4"], "takes no tree shape"),
        (["hi", "--drafter", "dspark", "--tree", "2,3"], "three integers"),
        (["hi", "--device", "tpu"], "use auto, cpu, cuda or cuda:N"),
    ],
)
def test_bad_input_gets_a_clear_error(args, message):
    _assert_clear_error(_run(*args), message)


def _assert_clear_error(proc: subprocess.CompletedProcess, message: str) -> None:
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_unknown_flag_value_is_a_usage_error():
    _assert_clear_error(_run("hi", "--dtype", "float8"), "invalid choice")
    _assert_clear_error(_run("hi", "--drafter", "nope"), "unknown drafter 'nope'")


@pytest.mark.slow
def test_prompt_longer_than_the_context(default_target):
    _assert_clear_error(_run("word " * 9000, "--raw", "--dtype", "float32"), "the context holds 8192")


@pytest.mark.slow
def test_chat_on_a_base_model_is_refused():
    _assert_clear_error(_run("hello", "--model", "gemma3-270m"), "no chat template")


@pytest.mark.slow
def test_json_output_matches_the_engine(default_target):
    """The CLI's speculative tokens equal plain decoding in the library (fp32, greedy)."""
    prompt = "List three prime numbers."
    proc = _run(prompt, "--json", "--max-tokens", "24", "--dtype", "float32", "--drafter", "ngram-tree")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    tok = default_target.tokenizer
    engine = Engine(default_target.model, eos_token_ids=default_target.eos_token_ids)
    plain = engine.generate([Request(tok.encode(prompt, chat=True), SamplingParams(max_tokens=24))])[0]
    assert out["token_ids"] == plain.token_ids
    assert out["text"] == tok.decode(plain.token_ids)
    assert out["generated_tokens"] == len(plain.token_ids)
    assert out["tau"] >= 1.0 and out["target_passes"] >= 1 and out["tokens_per_s"] > 0


@pytest.mark.slow
def test_streaming_prints_text_then_figures():
    proc = _run("Say hello.", "--max-tokens", "12", "--stop", "\n\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()
    assert "tau" in proc.stderr and "tok/s" in proc.stderr and "target passes" in proc.stderr
