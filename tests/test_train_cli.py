"""The DeepSpec pipeline as a user runs it, on the real default model: ``tandem data`` →
``tandem train`` → ``tandem eval`` → ``tandem generate --drafter FOLDER``, and clear errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


def _tandem(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tandem.cli", *args], capture_output=True, text=True, timeout=timeout)


def _ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> Path:
    """Four regenerated records and a DFlash drafter trained on them for two steps."""
    root = tmp_path_factory.mktemp("pipeline")
    prompts = root / "prompts.jsonl"
    turns = ["Write a haiku about rain.", "What is 12 times 7?", "Name three colors.", "Say hello in French."]
    prompts.write_text("".join(json.dumps({"turns": [t]}) + "\n" for t in turns))
    data = root / "data.jsonl"
    _ok(_tandem("data", "--prompts", str(prompts), "--out", str(data), "--max-tokens", "24", "--batch-size", "4"))
    drafter = root / "dflash"
    args = ["--algo", "dflash", "--data", str(data), "--out", str(drafter), "--steps", "2", "--batch-size", "2"]
    checks = ["--eval-limit", "1", "--eval-tokens", "8"]
    _ok(_tandem("train", *args, *checks, "--warmup", "1", "--draft-vocab", "512", "--block-size", "4"))
    return drafter


def test_train_writes_a_drafter_folder(pipeline):
    config = json.loads((pipeline / "config.json").read_text())
    assert config["algo"] == "dflash" and config["target"] == "smollm2-135m-instruct"
    assert config["draft_vocab"] == 512 and config["block_size"] == 4
    assert (pipeline / "model.safetensors").stat().st_size < 20 << 20
    summary = json.loads((pipeline / "training.json").read_text())
    assert summary["steps"] == 2 and summary["examples"] == 4
    curve = summary["learning_curve"]  # τ checks at the start and the end
    assert [p["step"] for p in curve] == [0, 2] and curve[-1]["tokens"] == summary["response_tokens_seen"] > 0
    assert set(curve[0]["tau"]) == {"mt-bench", "gsm8k", "humaneval", "math500", "mbpp", "all"}
    assert all(t >= 1.0 for p in curve for t in p["tau"].values())


def test_online_features_train_the_same_drafter_without_a_cache(pipeline, tmp_path):
    data = pipeline.parent / "data.jsonl"
    args = ["--algo", "dflash", "--data", str(data), "--steps", "2", "--batch-size", "2", "--warmup", "1"]
    args += ["--eval-limit", "0", "--draft-vocab", "512", "--block-size", "4"]
    _ok(_tandem("train", *args, "--out", str(tmp_path / "cached")))
    before = set(pipeline.parent.iterdir())
    _ok(_tandem("train", *args, "--out", str(tmp_path / "online"), "--features", "online"))
    made = {p.name for p in set(pipeline.parent.iterdir()) - before}
    assert all(".online-" in name for name in made)  # no feature cache: only the (empty) replay folder
    # the same examples and features (bit for bit: tests/test_drafters.py); the backward pass on
    # 2 threads is not bit-reproducible from run to run, so the losses agree closely, not exactly
    cached, online = (json.loads((tmp_path / side / "training.json").read_text()) for side in ("cached", "online"))
    assert cached["response_tokens_seen"] == online["response_tokens_seen"] and cached["steps"] == online["steps"]
    assert abs(cached["final_loss"] - online["final_loss"]) < 1e-3


def test_learning_curve_plot(pipeline, tmp_path):
    out = tmp_path / "curve"
    script = Path(__file__).parent.parent / "bench" / "learning_curve.py"
    _ok(subprocess.run([sys.executable, str(script), str(pipeline), "--out", str(out)], capture_output=True, text=True))
    assert json.loads(out.with_suffix(".json").read_text())["curves"]["dflash"][-1]["step"] == 2
    assert out.with_suffix(".png").stat().st_size > 10_000
    bad = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True)
    assert bad.returncode == 2 and "no readable training.json" in bad.stderr and "Traceback" not in bad.stderr


def test_eval_reports_tau_and_acceptance(pipeline, tmp_path):
    out = tmp_path / "eval"
    args = ["--drafter", str(pipeline), "--drafter", "ngram", "--benchmarks", "mbpp,gsm8k", "--limit", "1"]
    _ok(_tandem("eval", *args, "--max-tokens", "12", "--temperature", "0", "1", "--out", str(out)))
    results = json.loads(out.with_suffix(".json").read_text())["results"]
    assert set(results) == {"0", "1"}
    for per_method in results.values():
        assert set(per_method) == {"plain", "dflash", "ngram"}
        for name, cells in per_method.items():
            assert set(cells) == {"mbpp", "gsm8k", "all"}
            assert cells["all"]["tokens"] > 0 and cells["all"]["tokens_per_s"] > 0
            if name != "plain":
                assert cells["all"]["tau"] >= 1.0
                assert all(0.0 <= a <= 1.0 for a in cells["all"]["acceptance_by_position"])
    assert "| dflash |" in out.with_suffix(".md").read_text()
    for suffix in ("-tau.png", "-acceptance.png"):
        assert (tmp_path / f"eval{suffix}").stat().st_size > 1000


def test_generate_with_a_drafter_folder_equals_plain_decoding(pipeline):
    common = ["Name three colors.", "--max-tokens", "24", "--dtype", "float32", "--json"]
    spec = json.loads(_ok(_tandem("generate", *common, "--drafter", str(pipeline))).stdout)
    plain = json.loads(_ok(_tandem("generate", *common, "--drafter", "none")).stdout)
    assert spec["token_ids"] == plain["token_ids"]
    assert spec["drafter"] == str(pipeline)


def test_a_drafter_trained_in_deepspecs_layout_exports_and_serves_exactly(pipeline, tmp_path):
    """``--layout deepspec`` -> ``tandem export --format deepspec`` -> a folder in DeepSpec's layout
    that ``--drafter`` loads back (as vLLM would) and that keeps greedy output equal to plain."""
    trained, exported = tmp_path / "dspark", tmp_path / "exported"
    args = ["--algo", "dspark", "--data", str(pipeline.parent / "data.jsonl"), "--out", str(trained), "--steps", "1"]
    _ok(_tandem("train", *args, "--batch-size", "2", "--eval-limit", "0", "--block-size", "4", "--layout", "deepspec"))
    _ok(_tandem("export", str(trained), "--format", "deepspec", "--out", str(exported)))
    config = json.loads((exported / "config.json").read_text())
    assert config["architectures"] == ["Qwen3DSparkModel"] and config["block_size"] == 4
    assert config["markov_head_type"] == "vanilla" and config["enable_confidence_head"] is True
    common = ["Name three colors.", "--max-tokens", "24", "--dtype", "float32", "--json"]
    spec = json.loads(_ok(_tandem("generate", *common, "--drafter", str(exported))).stdout)
    plain = json.loads(_ok(_tandem("generate", *common, "--drafter", "none")).stdout)
    assert spec["token_ids"] == plain["token_ids"]
    refused = _tandem("export", str(pipeline), "--format", "deepspec", "--out", str(tmp_path / "no"))
    assert (
        refused.returncode == 2 and "not in deepspec's layout" in refused.stderr and "Traceback" not in refused.stderr
    )


def test_teacher_forced_data_needs_no_generation(tmp_path):
    """``--responses dataset`` keeps ShareGPT's own replies (no target decoding), and training on
    them is marked teacher-forced (labels: the target's greedy tokens)."""
    pairs = [("Name a fruit.", "An apple."), ("Say hi.", "Hi there!"), ("Count to three.", "1, 2, 3.")]
    convs = [
        {"id": f"c{i}", "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}
        for i, (q, a) in enumerate(pairs)
    ]
    convs.append({"id": "lonely", "conversations": [{"from": "human", "value": "No answer here."}]})
    source, data = tmp_path / "sharegpt.json", tmp_path / "tf.jsonl"
    source.write_text(json.dumps(convs))
    proc = _ok(_tandem("data", "--prompts", str(source), "--out", str(data), "--responses", "dataset"))
    assert "wrote 3 records" in proc.stderr and "1 without a reply" in proc.stderr
    records = [json.loads(line) for line in data.read_text().splitlines()]
    assert [r["response"] for r in records] == [a for _, a in pairs]
    assert all(r["finish_reason"] == "stop" for r in records)
    assert json.loads((tmp_path / "tf.meta.json").read_text())["responses"] == "dataset"

    out = tmp_path / "dspark"
    args = ["--algo", "dspark", "--data", str(data), "--out", str(out), "--steps", "1", "--records", "2"]
    _ok(_tandem("train", *args, "--batch-size", "2", "--eval-limit", "0", "--draft-vocab", "256", "--block-size", "4"))
    summary = json.loads((out / "training.json").read_text())
    assert summary["teacher_forced"] is True and summary["settings"]["records"] == 2


@pytest.mark.parametrize(
    "args,message",
    [
        (["train", "--algo", "dspark", "--data", "/no/such.jsonl", "--out", "x"], "cannot read"),
        (["train", "--algo", "dspark", "--data", "d", "--out", "x", "--records", "0"], "--records must be >= 1"),
        (["train", "--algo", "medusa", "--data", "d", "--out", "x"], "invalid choice"),
        (["train", "--algo", "dspark", "--data", "d", "--out", "x", "--steps", "0"], "--steps must be >= 1"),
        (["eval", "--drafter", "/no/such/drafter"], "unknown drafter"),
        (["eval", "--drafter", "ngram", "--benchmarks", "trivia"], "unknown benchmark 'trivia'"),
        (["eval", "--drafter", "ngram", "--temperature", "-1"], "--temperature must be >= 0"),
    ],
)
def test_bad_input_gets_a_clear_error(args, message, tmp_path):
    proc = _tandem(*args)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_broken_prompts_file_is_refused(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"turns": ["fine"]}\n{"questions": ["no turns"]}\n')
    proc = _tandem("eval", "--drafter", "ngram", "--prompts-file", str(bad))
    assert proc.returncode == 2 and "line 2" in proc.stderr and "Traceback" not in proc.stderr
