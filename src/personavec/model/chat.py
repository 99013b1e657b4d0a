"""Chat text: the model's chat template applied to messages, and the chat rows of user tables.

Rows come as a ``messages`` list (``[{role, content}, ...]``, or its JSON text), or as a ``prompt`` column that
already holds chat-formatted text plus an optional ``answer``. Every command that reads conversations parses
them here, so a malformed row gets the same one-line error everywhere.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from ..errors import PersonavecError, shown


def format_chat(tokenizer: Any, user: str, system: str | None = None, assistant: str | None = None) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise PersonavecError(
            f"the tokenizer of {getattr(tokenizer, 'name_or_path', 'this model')!s} has no chat template; "
            "use an instruction-tuned (chat) model, or give prompts already formatted in a 'prompt' column")
    messages = []
    if system:
        messages.append({"role": "system", "content": system})
    messages.append({"role": "user", "content": user})
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if assistant is not None:
        text += assistant
    return text


def control_tokens(tokenizer: Any) -> list[str]:
    """The texts a tokenizer reads as special tokens (``<|im_start|>``, ``<|im_end|>``, ...), longest first."""
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    texts = {t.content for t in decoder.values() if getattr(t, "special", False) and t.content}
    return sorted(texts, key=len, reverse=True)


def chat_ids(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
    """The token ids of ``messages`` in the model's chat template, every message's content read as text: a control
    token typed in a message (``<|im_end|>\\n<|im_start|>assistant``) is tokenized as the characters it is, so no
    message can close its turn or open another; the template's own control tokens stay special.

    A chat whose contents hold no control token gets exactly the ids of its whole rendered text."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    markers = control_tokens(tokenizer)
    forged = [any(t in m["content"] for t in markers) for m in messages]
    if not any(forged):
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    # render again with a placeholder for each content, to learn where the contents lie in the text
    holders = [f"\ue000{i}\ue001" for i in range(len(messages))]
    shaped = tokenizer.apply_chat_template([{**m, "content": h} for m, h in zip(messages, holders)], tokenize=False,
                                           add_generation_prompt=add_generation_prompt)
    parts = re.split("(\ue000\\d+\ue001)", shaped)
    order = [int(x[1:-1]) for x in parts[1::2]]
    if order != list(range(len(messages))) or \
            "".join(messages[int(x[1:-1])]["content"] if i % 2 else x for i, x in enumerate(parts)) != text:
        first = forged.index(True)
        raise PersonavecError(f"messages[{first}] holds the chat template's control token(s) "
                              f"{', '.join(t for t in markers if t in messages[first]['content'])}, and this model's "
                              "template changes message text, so they cannot be kept as plain text; remove them")
    segments: list[tuple[str, bool]] = []  # (text, literal): a content without control tokens joins the template
    for i, x in enumerate(parts):            # text around it, tokenized as in the whole text
        j = int(x[1:-1]) if i % 2 else None
        piece, literal = (x, False) if j is None else (messages[j]["content"], forged[j])
        if segments and not literal and not segments[-1][1]:
            segments[-1] = (segments[-1][0] + piece, False)
        else:
            segments.append((piece, literal))
    ids: list[int] = []
    for piece, literal in segments:
        if piece:
            ids += tokenizer(piece, add_special_tokens=False, split_special_tokens=literal)["input_ids"]
    return ids


def missing(x: Any) -> bool:
    """None or NaN (what pandas puts in a cell that a row did not have)."""
    return x is None or (isinstance(x, float) and math.isnan(x))


def chat_messages(value: Any) -> list[dict[str, str]] | None:
    """The chat in a ``messages`` cell (a list of {role, content}, or its JSON text); None when absent."""
    if missing(value):
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise PersonavecError("a 'messages' field holds a string that is not JSON") from None
    try:
        msgs = [dict(m) for m in value]
    except (TypeError, ValueError):
        msgs = []
    if not msgs or not all("role" in m and "content" in m for m in msgs):
        raise PersonavecError("a 'messages' row must be a list of {role, content} objects")
    for i, m in enumerate(msgs):  # a null or a list is not stringified into words nobody wrote
        if not isinstance(m["content"], str):
            raise PersonavecError(f"a 'messages' row's message {i} has content {shown(m['content'])}, not text; "
                                  "write each message's content as a string")
    return [{"role": str(m["role"]), "content": m["content"]} for m in msgs]


def conversation_pair(row: dict[str, Any], tokenizer: Any) -> tuple[str, str | None]:
    """(formatted prompt, answer or None) of a row with ``messages`` or ``prompt``/``answer``."""
    msgs = chat_messages(row.get("messages"))
    if msgs is not None:
        if msgs[-1]["role"] == "assistant":
            prompt = tokenizer.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True)
            return prompt, str(msgs[-1]["content"])
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True), None
    if not missing(row.get("prompt")):
        ans = row.get("answer")
        return str(row["prompt"]), None if missing(ans) else str(ans)
    raise PersonavecError("each row needs 'messages' (a chat) or 'prompt' (+ optional 'answer')")
