"""A judge-free fluency reading: how likely a reference model finds an answer, per answer token.

``answer_nll`` is the mean negative log-likelihood of the answer's tokens given the chat-formatted prompt,
teacher-forced through a reference model (usually the base model). Garbled or degenerate answers score high,
fluent ones low. It is *not* the paper's coherence judge; personavec reports it beside the judge's coherence
so that a fine-tune or a steering setting that breaks the model's language shows up even when no capable
judge is at hand.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..model.activations import encode_for, length_batches, make_batch
from ..model.loading import LoadedModel, pad_token_id


@torch.no_grad()
def answer_nll(lm: LoadedModel, prompts: Sequence[str], answers: Sequence[str], batch_size: int = 16,
               max_length: int | None = None) -> list[float]:
    """Mean NLL (nats) per answer token of each answer after its prompt; NaN for an empty answer."""
    encs = encode_for(lm, list(prompts), list(answers), max_length)
    out = [math.nan] * len(encs)
    pad = pad_token_id(lm.tokenizer)
    for idx in length_batches([len(e.ids) for e in encs], batch_size):
        todo = [i for i in idx if encs[i].n_response > 0]
        if not todo:
            continue
        batch = make_batch([encs[i] for i in todo], pad, "right", lm.device)
        logits = lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                          position_ids=batch.position_ids, use_cache=False).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        tok_lp = logp.gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1)  # [B, T-1]: log p(token t+1)
        w = (batch.weights["response_avg"][:, 1:] > 0).float()  # positions whose next token is an answer token
        nll = -(tok_lp * w).sum(1) / w.sum(1)
        for j, i in enumerate(todo):
            out[i] = float(nll[j])
    return out
