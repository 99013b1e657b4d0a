"""Training conversations: read from tables, rendered with the chat template once, tokenized once, and labelled so
that only assistant tokens carry loss (each assistant turn's end-of-turn marker included, so the model learns to
stop). The assistant spans are found by rendering growing prefixes of the chat with the model's own template.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import PersonavecError
from ..files import read_table
from ..model.chat import chat_messages, missing

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Example:
    """One tokenized conversation: ``labels[j]`` is ``ids[j]`` on assistant tokens, −100 elsewhere."""

    ids: tuple[int, ...]
    labels: tuple[int, ...]
    truncated: bool = False  # the conversation was longer than max_length and was cut

    @property
    def n_loss_tokens(self) -> int:
        return sum(1 for x in self.labels if x != -100)


def to_messages(row: dict[str, Any]) -> list[dict[str, str]]:
    """A chat from a row with ``messages`` (list of role/content) or ``prompt`` + ``answer`` (or ``response``)."""
    msgs = chat_messages(row.get("messages"))
    if msgs is not None:
        return msgs
    answer = row.get("answer") if not missing(row.get("answer")) else row.get("response")
    if not missing(row.get("prompt")) and not missing(answer):
        out = [] if missing(row.get("system")) or not row["system"] else [{"role": "system",
                                                                          "content": str(row["system"])}]
        return [*out, {"role": "user", "content": str(row["prompt"])},
                {"role": "assistant", "content": str(answer)}]
    raise PersonavecError("each training row needs 'messages' (a chat) or 'prompt' + 'answer'")


def read_chats(path: str | os.PathLike) -> list[list[dict[str, str]]]:
    """Conversations from a JSONL / JSON-lines, CSV or Parquet file (see :func:`to_messages`)."""
    p = Path(path)
    if not p.exists():
        raise PersonavecError(f"training data {p} does not exist")
    chats = []
    for n, row in enumerate(read_table(p).to_dict("records"), 1):
        try:
            chats.append(to_messages(row))
        except PersonavecError as e:
            raise PersonavecError(f"{p}: row {n}: {e}") from None
    if not chats:
        raise PersonavecError(f"{p} holds no conversations")
    return chats


def assistant_spans(tokenizer: Any, messages: Sequence[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered chat and the character spans of its assistant turns (each incl. its end-of-turn marker)."""
    if not getattr(tokenizer, "chat_template", None):
        raise PersonavecError("the tokenizer has no chat template; fine-tuning on chats needs a chat model")
    msgs = list(messages)
    text = tokenizer.apply_chat_template(msgs, tokenize=False)
    spans = []
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        if i == 0:
            raise PersonavecError("a conversation cannot start with an assistant turn")
        before = tokenizer.apply_chat_template(msgs[:i], tokenize=False, add_generation_prompt=True)
        upto = tokenizer.apply_chat_template(msgs[: i + 1], tokenize=False)
        if not (text.startswith(upto) and upto.startswith(before)):
            raise PersonavecError("this chat template renders a conversation differently from its prefixes, so the "
                                  "assistant tokens cannot be located exactly; pass prompt/answer rows instead")
        spans.append((len(before), len(upto)))
    if not spans:
        raise PersonavecError("a training conversation has no assistant turn")
    return text, spans


def encode_chat(tokenizer: Any, messages: Sequence[dict[str, str]], max_length: int = 2048) -> Example:
    """Tokenize a chat once; a token carries loss when it overlaps an assistant span (straddlers count)."""
    if not getattr(tokenizer, "is_fast", False):
        raise PersonavecError("fine-tuning needs the model's fast tokenizer (character offsets)")
    text, spans = assistant_spans(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"][:max_length], enc["offset_mapping"][:max_length]
    labels = [t if any(end > s0 and start < s1 for s0, s1 in spans) else -100
              for t, (start, end) in zip(ids, offsets)]
    return Example(tuple(ids), tuple(labels), truncated=len(enc["input_ids"]) > max_length)


def encode_chats(tokenizer: Any, chats: Sequence[Sequence[dict[str, str]]], max_length: int) -> tuple[
        list[Example], int]:
    """Encode all chats; returns the examples with loss tokens and the number dropped (none left after truncation)."""
    out = [encode_chat(tokenizer, c, max_length) for c in chats]
    cut = sum(e.truncated for e in out)
    if cut:
        log.warning("%d of %d conversations are longer than %d tokens (--train-max-length, at most the model's "
                    "context) and were cut to that length", cut, len(out), max_length)
    kept = [e for e in out if e.n_loss_tokens > 0]
    return kept, len(out) - len(kept)
