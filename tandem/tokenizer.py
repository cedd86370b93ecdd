"""Tokenizer and chat template of a model folder, plus incremental detokenization."""

from __future__ import annotations

from collections.abc import Callable, Sequence
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
        from jinja2 import TemplateError

        try:
            ids = self.hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        except TemplateError as exc:  # e.g. roles a template does not take (Gemma's raise_exception)
            raise InvalidRequest(f"the chat template refused the messages: {exc}") from None
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)

    def decode(self, ids: Sequence[int]) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=True)


class IncrementalDecoder:
    """The text of a growing list of ids, decoding a short window per id instead of the whole list
    (vLLM's prefix and read offsets): the text added by new ids is what the window decodes beyond
    the ids before them. ``ends[k]`` is the text's length once ``k`` ids are in; an id that ends
    inside a UTF-8 character adds nothing until the character is complete."""

    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self.decode = decode
        self.ids: list[int] = []
        self.text = ""
        self.ends = [0]
        self._prefix = self._read = 0  # ids[prefix:read]: context for the next window; read: decoded

    def push(self, new_ids: Sequence[int]) -> None:
        for token in new_ids:
            self.ids.append(token)
            before = self.decode(self.ids[self._prefix : self._read])
            window = self.decode(self.ids[self._prefix :])
            if len(window) > len(before) and not window.endswith("\ufffd"):
                self.text += window[len(before) :]
                self._prefix, self._read = self._read, len(self.ids)
            self.ends.append(len(self.text))

    def tail(self) -> str:
        """Text of the ids not yet in :attr:`text` (an incomplete character decodes as U+FFFD)."""
        before = self.decode(self.ids[self._prefix : self._read])
        return self.decode(self.ids[self._prefix :])[len(before) :]


class Detokenizer:
    """Turns a growing list of ids into text deltas. It holds back an incomplete UTF-8 tail and
    anything that may still become a stop string, and never emits a stop string itself."""

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = ()) -> None:
        self.decoder = IncrementalDecoder(tokenizer.decode)
        self.stop = tuple(stop)
        self.holdback = max((len(s) for s in self.stop), default=1) - 1
        self.text = ""  # what has been emitted
        self.stopped = False  # a stop string was met: nothing more is emitted

    @property
    def ids(self) -> list[int]:
        return self.decoder.ids

    def push(self, new_ids: Sequence[int], final: bool = False) -> str:
        if self.stopped:
            return ""
        searched = max(0, len(self.decoder.text) - self.holdback)  # a stop ends after this: seen now
        self.decoder.push(new_ids)
        text = self.decoder.text + (self.decoder.tail() if final else "")
        cuts = [i for i in (text.find(s, searched) for s in self.stop) if i >= 0]
        if cuts:
            text, final, self.stopped = text[: min(cuts)], True, True
        end = len(text) if final else max(0, len(text) - self.holdback)
        delta = text[len(self.text) : end]
        self.text += delta
        return delta
