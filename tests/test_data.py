"""``tandem data``: prompts read record by record (truncated and broken input counted, evaluation
prompts never kept) and responses regenerated exactly as the engine's plain decoding, resumably."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tandem.cli import main
from tandem.drafters import NgramDrafter
from tandem.engine import Engine, Request
from tandem.models.loading import load_model
from tandem.sampling import SamplingParams
from tandem.train.prompts import (
    Broken,
    DataError,
    Prompt,
    eval_prompts,
    iter_json_array,
    read_jsonl,
    read_prompts,
    sharegpt_path,
)
from tandem.train.regenerate import check_meta, done_ids, meta_path, regenerate, responses_of, write_replies
from tests.tiny_models import build_tiny

VOCAB = 64


def _conversation(id_: str, *turns: tuple[str, str]) -> dict:
    return {"id": id_, "conversations": [{"from": who, "value": text} for who, text in turns]}


@pytest.mark.parametrize("chunk_chars", [1, 7, 1 << 20])
def test_json_array_keeps_complete_elements_and_flags_the_truncated_tail(chunk_chars):
    records = [_conversation(f"c{i}", ("human", f'question {i} \\ \u00e9 "q"'), ("gpt", "a" * i)) for i in range(5)]
    text = json.dumps(records, indent=2)
    cut = text[: text.index('"c4"') + 30]  # inside the last record's first string
    assert list(iter_json_array(io.StringIO(cut), chunk_chars)) == [*records[:4], Broken("truncated")]
    assert list(iter_json_array(io.StringIO(text), chunk_chars)) == records


@pytest.mark.parametrize(
    "text,expected",
    [
        ("[12345, 678, true]", [12345, 678, True]),  # literals split across chunks
        ('[{"a": 1}, {"a": 2}', [{"a": 1}, {"a": 2}]),  # no "]" but no element lost
        ('[{"a": 1}, {"a": tru', [{"a": 1}, Broken("truncated")]),
        ('[{"a": 1}, {"a": "\\u00', [{"a": 1}, Broken("truncated")]),
        ('[{"a": 1}, {"a" 2}, {"a": 3}]', [{"a": 1}, Broken("broken")]),
        ("  []", []),
    ],
)
def test_json_array_edge_cases(text, expected):
    assert list(iter_json_array(io.StringIO(text), chunk_chars=2)) == expected


def test_sharegpt_file_counts_every_kind_of_drop(tmp_path):
    gsm8k = json.loads((Path(__file__).parents[1] / "tandem/data/prompts/gsm8k.jsonl").open().readline())["turns"][0]
    records = [
        _conversation("keep", ("human", "Hello there"), ("gpt", "Hi")),
        _conversation("gpt-first", ("gpt", "Hi"), ("human", "Hello")),
        _conversation("system-first", ("system", "Be nice"), ("human", "Hello")),
        _conversation("no-turns"),
        _conversation("blank", ("human", "  \n")),
        _conversation("eval", ("human", "  " + gsm8k.replace(" ", "\n  ") + " ")),
        _conversation("keep", ("human", "Same id again"), ("gpt", "Hi")),
        {"conversations": [{"from": "user", "value": "No id of its own"}]},
        {"conversations": "not a list"},
        _conversation("cut", ("human", "This one is cut off")),
    ]
    text = json.dumps(records)
    path = tmp_path / "sharegpt.json"
    path.write_text(text[: text.rindex("cut off")], encoding="utf-8")
    prompts, stats = read_prompts(path, eval_prompts())
    assert prompts == [Prompt("keep", "Hello there", "Hi"), Prompt("sharegpt-7", "No id of its own")]
    assert stats.as_dict() == {
        "read": 10,
        "complete": 9,
        "human_first": 5,
        "kept": 2,
        "dropped": {
            "broken": 1,
            "duplicate_id": 1,
            "empty": 2,
            "eval_overlap": 1,
            "not_human_first": 2,
            "truncated": 1,
        },
    }


def test_jsonl_broken_lines_are_counted_not_fatal(tmp_path):
    path = tmp_path / "mine.jsonl"
    lines = [
        '{"turns": ["First prompt", "a follow-up"]}',
        "",
        '{"turns": ["Second prompt"',
        "[1, 2]",
        json.dumps(_conversation("sg", ("human", "ShareGPT-style line"))),
        '{"turns": []}',
        '{"turns": ["\\ud800 a lone surrogate"]}',
        '{"turns": ["Third prompt"]}',
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    prompts, stats = read_prompts(path)
    kept = [("mine-0", "First prompt"), ("sg", "ShareGPT-style line"), ("mine-6", "Third prompt")]
    assert prompts == [Prompt(*p) for p in kept]
    assert (stats.read, stats.kept, dict(stats.dropped)) == (7, 3, {"broken": 3, "empty": 1})


def test_jsonl_records_may_hold_unicode_line_separators(tmp_path):
    """JSON strings may hold U+2028, U+0085 or U+001C unescaped (ShareGPT does, in the shared
    training data): only "\\n" ends a line."""
    path = tmp_path / "records.jsonl"
    texts = ["one\u2028two", "three\x85four\x1cfive", "plain"]
    path.write_text("".join(json.dumps({"t": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    assert read_jsonl(path, "a record", lambda r: r["t"]) == texts


def test_eval_sets_cover_every_benchmark_turn():
    found = eval_prompts()
    assert len(found) > 2000
    assert "Take a moment to evaluate and critique your own response." in found  # an MT-bench second turn


@pytest.mark.slow
def test_real_sharegpt_dump():
    """The file on PyPI is cut off mid-string; everything before the cut is kept."""
    prompts, stats = read_prompts(sharegpt_path(), eval_prompts())
    assert 17_000 <= stats.complete <= 18_500
    assert 10_500 <= stats.human_first <= 11_700
    assert stats.read == stats.complete + 1 and stats.dropped["truncated"] == 1
    assert stats.kept == len(prompts) == len({p.id for p in prompts})
    assert stats.kept + sum(stats.dropped.values()) == stats.read


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    build_tiny("llama", folder, vocab=VOCAB)
    return load_model(folder, torch.float32)[0]


def _encode(text: str) -> list[int]:
    return [ord(c) % VOCAB for c in text]


def _decode(ids: list[int]) -> str:
    return " ".join(map(str, ids))


PROMPTS = [Prompt(f"p{i}", text) for i, text in enumerate(["abcabcabc", "hello world", "xyz" * 7, "q"])]


def _records(path: Path) -> dict[str, dict]:
    lines = path.read_text(encoding="utf-8").splitlines()
    records = {r["id"]: r for r in map(json.loads, lines)}
    assert len(records) == len(lines)
    return records


def test_regeneration_equals_plain_decoding_and_resumes(tiny, tmp_path):
    params = SamplingParams(max_tokens=12)
    out = tmp_path / "out.jsonl"
    engine = Engine(tiny, NgramDrafter(depth=4))
    args = dict(encode=_encode, decode=_decode, out=out, params=params, batch_size=2, max_prompt_tokens=16)
    first = regenerate(engine, PROMPTS[:2], **args)
    assert (first.written, first.already_done) == (2, 0)
    with out.open("a") as f:
        f.write('{"id": "p2", "prom')  # an interrupted write
    second = regenerate(engine, PROMPTS, **args)
    assert (second.selected, second.already_done, second.too_long, second.written) == (4, 2, 1, 1)

    records = _records(out)
    assert sorted(records) == ["p0", "p1", "p3"]  # p2 has 21 tokens > 16
    plain = Engine(tiny).generate([Request(_encode(p.text), params) for p in PROMPTS])
    for prompt, result in zip(PROMPTS, plain):
        if prompt.id in records:
            r = records[prompt.id]
            assert r["prompt"] == prompt.text and r["prompt_ids"] == _encode(prompt.text)
            assert r["response_ids"] == result.token_ids and r["response"] == _decode(result.token_ids)
            assert r["finish_reason"] == result.finish_reason
    assert regenerate(engine, PROMPTS, **args).written == 0


def test_sampled_records_do_not_depend_on_batching(tiny, tmp_path):
    params = SamplingParams(temperature=1.0, max_tokens=10, seed=7)
    outputs = []
    for batch_size in (1, 3):
        out = tmp_path / f"b{batch_size}.jsonl"
        regenerate(Engine(tiny, NgramDrafter(depth=4)), PROMPTS, _encode, _decode, out, params, batch_size)
        outputs.append(_records(out))
    assert outputs[0] == outputs[1]
    assert len({tuple(r["response_ids"]) for r in outputs[0].values()}) == len(PROMPTS)


def test_teacher_forced_records_are_the_sources_own_replies(tmp_path):
    prompts = [
        Prompt("a", "hello", "abc"),
        Prompt("b", "no answer"),
        Prompt("c", "q", "x" * 20),
        Prompt("d", "long" * 10, "ok"),
    ]
    out = tmp_path / "tf.jsonl"
    args = dict(encode=_encode, encode_reply=_encode, decode=_decode, out=out, stop_id=63, max_tokens=8)
    stats = write_replies(prompts[:1], **args, max_prompt_tokens=16)
    stats = write_replies(prompts, **args, max_prompt_tokens=16)
    assert (stats.already_done, stats.no_reply, stats.too_long, stats.written) == (1, 1, 1, 1)
    records = _records(out)
    assert sorted(records) == ["a", "c"]
    assert records["a"]["prompt_ids"] == _encode("hello")
    assert (records["a"]["response_ids"], records["a"]["finish_reason"]) == ([*_encode("abc"), 63], "stop")
    assert (records["c"]["response_ids"], records["c"]["finish_reason"]) == (_encode("x" * 8), "length")
    assert records["c"]["response"] == _decode(_encode("x" * 8))


def test_resuming_with_other_settings_or_a_foreign_file_is_refused(tmp_path):
    out = tmp_path / "d.jsonl"
    out.write_text('{"id": "a"}\n')
    settings = {"model": "m", "dtype": "float32", "temperature": 0.0, "max_tokens": 8, "seed": 0}
    meta_path(out).write_text(json.dumps(settings))  # as written before teacher-forced data existed
    assert responses_of(out) == "target"
    settings["responses"] = "target"
    check_meta(out, settings)
    with pytest.raises(DataError, match="temperature 0.0 -> 0.7"):
        check_meta(out, {**settings, "temperature": 0.7})
    with pytest.raises(DataError, match="responses 'target' -> 'dataset'"):
        check_meta(out, {**settings, "responses": "dataset"})
    assert done_ids(out) == {"a"}
    out.write_text('{"id": "a"}\n[1]\n')
    with pytest.raises(DataError, match="line 2 is not a tandem data record"):
        done_ids(out)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--prompts", "/no/such/file.jsonl"], "cannot read prompts from '/no/such/file.jsonl'"),
        (["--prompts", "."], "cannot read prompts from '.'"),
        (["--batch-size", "0"], "--batch-size must be >= 1"),
        (["--offset", "-1"], "--offset must be >= 0"),
        (["--temperature", "-1"], "temperature must be >= 0"),
        (["--max-tokens", "0"], "max_tokens must be > 0"),
        (["--prompts", "BROKEN"], "no prompts to regenerate (0 usable"),
    ],
)
def test_cli_errors_are_one_line(args, message, tmp_path, capsys):
    broken = tmp_path / "broken.jsonl"
    broken.write_text("{oops\n")
    args = [str(broken) if a == "BROKEN" else a for a in args]
    assert main(["data", *args, "--out", str(tmp_path / "o.jsonl")]) == 2
    err = capsys.readouterr().err
    assert f"tandem: error: {message}" in err and "Traceback" not in err


@pytest.mark.slow
def test_cli_end_to_end_on_the_default_model(default_target, tmp_path):
    out = tmp_path / "sharegpt.jsonl"
    cmd = [sys.executable, "-m", "tandem.cli", "data", "--limit", "3", "--max-tokens", "16", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "wrote 3 records" in proc.stderr and "tok/s" in proc.stderr

    tok = default_target.tokenizer
    records = list(_records(out).values())
    assert [r["id"] for r in records] == ["QWJhYvA_0", "i6IyJda_0", "A5AbcES_0"]  # the first human-first ones
    for r in records:
        assert r["prompt_ids"] == tok.encode(r["prompt"], chat=True)
        assert 0 < len(r["response_ids"]) <= 16 and r["finish_reason"] in ("stop", "length")
        assert tok.decode(r["response_ids"]) == r["response"] and r["response"].strip()
    meta = json.loads(meta_path(out).read_text())
    assert (meta["temperature"], meta["max_tokens"], meta["run"]["written"], meta["records"]) == (0.0, 16, 3, 3)
    assert meta["source"]["kept"] > 10_000
