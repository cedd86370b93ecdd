"""Tokenizer and chat template of a model folder, plus incremental detokenization."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from tandem.errors import InvalidRequest, ModelLoadError

Messages = Sequence[dict[str, str]]


class Tokenizer:
    """Wraps the Hugging Face tokenizer saved beside the weights."""

    def __init__(self, folder: str | Path) -> None:
        from transformers import AutoTokenizer  # heavy import; only where text is needed

        try:
            self.hf = AutoTokenizer.from_pretrained(folder)
        except Exception as exc:  # transformers raises many types for a broken folder
            raise ModelLoadError(f"cannot load a tokenizer from {str(folder)!r}: {exc}") from exc

    @property
    def has_chat_template(self) -> bool:
        return bool(self.hf.chat_template)

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return () if self.hf.eos_token_id is None else (int(self.hf.eos_token_id),)

    def encode(self, prompt: str | Messages, chat: bool) -> list[int]:
        """Token ids of a raw prompt, or of chat messages (a string is one user turn)."""
        if isinstance(prompt, str) and not prompt.strip():
            raise InvalidRequest("prompt is empty")
        if not chat:
            if not isinstance(prompt, str):
                raise InvalidRequest("a raw prompt must be a string; chat messages need the chat template")
            return list(self.hf.encode(prompt))
        if not self.has_chat_template:
            raise InvalidRequest("this model has no chat template (a base model): pass a raw prompt (--raw)")
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        if not messages:
            raise InvalidRequest("no chat messages")
        ids = self.hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)

    def decode(self, ids: Sequence[int]) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=True)


class Detokenizer:
    """Turns a growing list of ids into text deltas. It holds back an incomplete UTF-8 tail and
    anything that may still become a stop string, and never emits a stop string itself."""

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.holdback = max((len(s) for s in self.stop), default=1) - 1
        self.ids: list[int] = []
        self.text = ""  # what has been emitted

    def push(self, new_ids: Sequence[int], final: bool = False) -> str:
        self.ids.extend(new_ids)
        text = self.tokenizer.decode(self.ids)
        cuts = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if cuts:
            text, final = text[: min(cuts)], True
        end = len(text) if final else max(0, len(text.rstrip("\ufffd")) - self.holdback)
        delta = text[len(self.text) : end]
        self.text += delta
        return delta
