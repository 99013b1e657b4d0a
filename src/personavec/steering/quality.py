"""Judge-free readings of whether an answer is still text: fluency, repetition and degenerate flags.

* **fluency** — the mean negative log-likelihood (nats) per answer token under a reference model (the unsteered
  model), teacher-forced after the answer's prompt. Garbled answers score high.
* **repetition** — the share of the answer's token n-grams (n = 3) that already occurred earlier in the same
  answer: 0 for text that never repeats itself, near 1 for "just just just …". A model that loops finds its own
  loop likely, so fluency alone misses it; the two together catch both ways a steered answer breaks.
* **flags** — ``empty`` (no answer token, or only whitespace), ``repetitive`` (repetition above a ceiling).

Both readings come from one tokenization and one forward pass of each answer (:func:`answer_quality`). They are
not the paper's coherence judge: they are what the selection of a steering setting can always check, also when no
capable judge is at hand, and what the report shows beside the judge's coherence.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..model.activations import Encoded, encode_for, length_batches, make_batch
from ..model.loading import LoadedModel, pad_token_id

NGRAM = 3
#: an answer whose repetition is above this is flagged ``repetitive`` (ordinary answers of the embedded model stay
#: under 0.1; the looping answers of an over-steered one go above 0.5)
REPETITION_CEILING = 0.35


@dataclass(frozen=True)
class AnswerQuality:
    fluency: float  # mean NLL per answer token (nats); NaN for an empty answer
    repetition: float  # share of repeated token n-grams, 0..1
    n_tokens: int
    flags: tuple[str, ...] = ()

    @property
    def degenerate(self) -> bool:
        return bool(self.flags)


def repetition(ids: Sequence[int], n: int = NGRAM) -> float:
    """Share of the n-grams of ``ids`` that occurred earlier in ``ids`` (0 when there are fewer than n tokens)."""
    grams = [tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)]
    if not grams:
        return 0.0
    seen: set[tuple[int, ...]] = set()
    repeated = 0
    for g in grams:
        repeated += g in seen
        seen.add(g)
    return repeated / len(grams)


def flags_of(answer: str, rep: float, n_tokens: int, ceiling: float = REPETITION_CEILING) -> tuple[str, ...]:
    out = []
    if n_tokens == 0 or not answer.strip():
        out.append("empty")
    if rep > ceiling:
        out.append("repetitive")
    return tuple(out)


@torch.no_grad()
def answer_quality(lm: LoadedModel, prompts: Sequence[str], answers: Sequence[str], batch_size: int = 16,
                   max_length: int | None = None, ceiling: float = REPETITION_CEILING) -> list[AnswerQuality]:
    """Fluency, repetition and flags of each answer after its prompt, read by ``lm`` as it is (run it outside any
    steering context to read with the unsteered model). Batched by length; equal to one answer at a time."""
    encs = encode_for(lm, list(prompts), list(answers), max_length)
    nll = _nll(lm, encs, batch_size)
    out = []
    for e, a, x in zip(encs, answers, nll):
        rep = repetition(e.ids[e.n_prompt:])
        out.append(AnswerQuality(x, rep, e.n_response, flags_of(a, rep, e.n_response, ceiling)))
    return out


def answer_nll(lm: LoadedModel, prompts: Sequence[str], answers: Sequence[str], batch_size: int = 16,
               max_length: int | None = None) -> list[float]:
    """Mean NLL (nats) per answer token of each answer after its prompt; NaN for an empty answer."""
    return _nll(lm, encode_for(lm, list(prompts), list(answers), max_length), batch_size)


@torch.no_grad()
def _nll(lm: LoadedModel, encs: list[Encoded], batch_size: int) -> list[float]:
    out = [math.nan] * len(encs)
    pad = pad_token_id(lm.tokenizer)
    for idx in length_batches([len(e.ids) for e in encs], batch_size):
        todo = [i for i in idx if encs[i].n_response > 0 and encs[i].n_prompt > 0]
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
