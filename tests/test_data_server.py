"""``tandem data --server``: responses regenerated through a real ``tandem serve`` on loopback (its
OpenAI-compatible HTTP API, a real local Ray) are the very records in-process regeneration writes
(greedy), and an interrupted run resumes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tandem.sampling import SamplingParams
from tandem.train.regenerate import regenerate_dataset
from tests.cluster_helpers import (
    config_for,
    free_port,
    one_torch_thread,  # noqa: F401 - autouse
    running,
    tiny_chat_target,
)

pytestmark = [pytest.mark.ray, pytest.mark.slow]

PROMPTS = ["Name three colours.", "What is a cache?", "Count to five.", "Say hello in French.", "Why is the sky blue?"]


def _records(path: Path) -> dict[str, dict]:
    return {r["id"]: r for r in map(json.loads, path.read_text().splitlines())}


def _data(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "tandem.cli", "data", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=600)


def test_data_through_tandem_serve_equals_in_process_regeneration(tmp_path: Path) -> None:
    model = tiny_chat_target(tmp_path / "tiny-chat", 1024)
    source = tmp_path / "prompts.jsonl"
    source.write_text("".join(json.dumps({"id": f"p{i}", "turns": [p]}) + "\n" for i, p in enumerate(PROMPTS)))
    local = tmp_path / "local.jsonl"
    params = SamplingParams(max_tokens=24, seed=0)
    regenerate_dataset(source, local, str(model), "float32", "ngram", params, 2, 512, log=lambda _: None)

    config = config_for(model, free_port(), max_model_len=1024)
    remote = tmp_path / "remote.jsonl"
    flags = ["--prompts", str(source), "--model", str(model), "--max-tokens", "24", "--server-model", config.model]
    url = f"http://{config.http_address}"
    with running(config):
        first = _data(*flags, "--out", str(remote), "--server", url, "--limit", "3")
        assert first.returncode == 0 and "wrote 3 records" in first.stderr, first.stderr
        rest = _data(*flags, "--out", str(remote), "--server", url, "--concurrency", "2")
        assert rest.returncode == 0 and "wrote 2 records" in rest.stderr and "3 already there" in rest.stderr
        wrong = _data(*flags, "--out", str(tmp_path / "wrong.jsonl"), "--server", url, "--server-model", "nope")
    assert _records(remote) == _records(local)  # ids, prompt ids, response ids and text, finish reasons
    assert json.loads((tmp_path / "remote.meta.json").read_text())["server"] == url
    assert wrong.returncode == 2 and "HTTP 404" in wrong.stderr and "Traceback" not in wrong.stderr

    gone = _data(*flags, "--out", str(tmp_path / "gone.jsonl"), "--server", url)  # the server is down now
    assert gone.returncode == 2 and "cannot reach" in gone.stderr and "Traceback" not in gone.stderr
