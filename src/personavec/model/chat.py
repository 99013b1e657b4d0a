"""Chat text: the model's chat template applied to messages, and the chat rows of user tables.

Rows come as a ``messages`` list (``[{role, content}, ...]``, or its JSON text), or as a ``prompt`` column that
already holds chat-formatted text plus an optional ``answer``. Every command that reads conversations parses
them here, so a malformed row gets the same one-line error everywhere.
"""

from __future__ import annotations

import json
import math
from typing import Any

from ..errors import PersonavecError


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
    return [{"role": str(m["role"]), "content": str(m["content"])} for m in msgs]


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
