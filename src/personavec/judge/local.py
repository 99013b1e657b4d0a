"""A judge that reads a local Hugging Face model's own distribution over the scores 0–100.

For a judge prompt, the model's probability of answering exactly the integer ``k`` is
``P(k) = Π P(tokens of k) · P(stop | k)``, where the tokens of ``k`` are its canonical tokenization right
after the chat-formatted prompt (so tokenizers that split numbers into several tokens are handled) and
``P(stop | k)`` is the probability that the next token does not continue the number (does not start with
a digit). The score is ``Σ k·P(k) / Σ P(k)``; it is missing when ``Σ P(k) < 0.25`` (the model mostly says
something else, e.g. a refusal). Paths through non-canonical tokenizations of a number are not counted.

Cost: for a batch of prompts, one forward pass over the tokens they all start with (the rubric's instructions),
one over each prompt's own rest (left-padded), then one pass over the ~110 tokens of each prompt's score tree (all
prefixes of "0".."100") reusing the prompts' KV cache with a tree attention mask. :meth:`LocalJudge.score` orders
prompts so that a batch holds one rubric and, where it can, one question.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers.cache_utils import DynamicLayer

from ..model.activations import encode_pairs
from ..model.chat import format_chat
from ..model.layers import cache_kwarg, last_logits, output_cache
from ..model.loading import LoadedModel, pad_token_id
from .base import check_prompts

MIN_MASS = 0.25
SCORES = tuple(range(101))
MIN_SHARED = 8  # a shared prompt prefix shorter than this is not worth a pass of its own


def common_prefix(seqs: Sequence[Sequence[int]]) -> int:
    """The number of leading tokens all ``seqs`` share."""
    first, n = seqs[0], min(len(s) for s in seqs)
    for i in range(n):
        if any(s[i] != first[i] for s in seqs):
            return i
    return n


@dataclass
class ScoreDistribution:
    probs: dict[int, float]  # P(k) for k in 0..100 (unnormalized)

    @property
    def mass(self) -> float:
        return sum(self.probs.values())

    def expected(self, min_mass: float = MIN_MASS) -> float | None:
        m = self.mass
        if m < min_mass or m <= 0:
            return None
        return sum(k * p for k, p in self.probs.items()) / m


class LocalJudge:
    """Judge with a local causal LM (any chat model; stronger is better)."""

    def __init__(self, lm: LoadedModel, min_mass: float = MIN_MASS, batch_size: int = 8) -> None:
        self.lm = lm
        self.min_mass = min_mass
        self.batch_size = batch_size
        self._numbers: dict[str, list[tuple[int, ...]]] = {}
        # the dtype is part of the judge: scores in bfloat16 and float32 differ, and are cached apart
        self.name = f"local:{lm.model_id}@{lm.revision}:{str(lm.dtype).replace('torch.', '')}"
        vocab = lm.tokenizer.convert_ids_to_tokens(list(range(len(lm.tokenizer))))
        digit = torch.zeros(len(vocab), dtype=torch.bool)
        for i, tok in enumerate(vocab):
            text = lm.tokenizer.convert_tokens_to_string([tok]) if tok is not None else ""
            digit[i] = bool(text) and text[0].isdigit()
        self._continues = digit  # tokens that would extend a number
        # the model's forward keywords, looked up once
        self._last_logits = last_logits(lm.model)
        self._cache_kw = cache_kwarg(lm.model)

    def _number_tokens(self, prompt: str) -> list[tuple[int, ...]]:
        """The token sequence of each number 0..100 right after ``prompt``. It depends only on the prompt's last
        characters (tokens never span the chat template's final newline), so it is computed once per ending."""
        tail = prompt[-64:]
        if tail not in self._numbers:
            encs = encode_pairs(self.lm.tokenizer, [prompt] * len(SCORES), [str(k) for k in SCORES])
            self._numbers[tail] = [e.ids[e.n_prompt:] for e in encs]
        return self._numbers[tail]

    def _continue_mass(self, logprobs: torch.Tensor) -> torch.Tensor:
        """Probability of a token that extends a number, for each row of ``logprobs`` ``[..., vocab]``."""
        if self._continues.device != logprobs.device:
            self._continues = self._continues.to(logprobs.device)
        n = min(self._continues.numel(), logprobs.shape[-1])
        return logprobs[..., :n].exp().masked_fill(~self._continues[:n], 0.0).sum(-1)

    def distribution(self, judge_prompt: str) -> ScoreDistribution:
        """P(k) for every k in 0..100 for one filled rubric."""
        return self.distributions([judge_prompt])[0]

    def _prefill(self, prompt_ids: list[list[int]], share: bool = True) -> tuple[Any, torch.Tensor]:
        """One forward pass over the prompts (with their KV cache), returning it and the ``[B, T]`` attention mask.

        The tokens every prompt of the batch starts with (the rubric's instructions; the question too when a
        batch holds answers to one question) are computed once, as a batch of one, and their cache is shared by
        all rows; each row's own rest is left-padded after it. Rows: ``[shared prefix | padding | own tokens]``,
        so the last column holds every prompt's last token.
        """
        lm, dev, pad = self.lm, self.lm.device, pad_token_id(self.lm.tokenizer)
        shared = common_prefix(prompt_ids) if share and len(prompt_ids) > 1 else 0
        shared = min(shared, min(len(p) for p in prompt_ids) - 1)  # every row keeps a token of its own
        if shared < MIN_SHARED:
            shared = 0
        rests = [p[shared:] for p in prompt_ids]
        B, S = len(rests), max(len(r) for r in rests)
        ids = torch.full((B, S), pad, dtype=torch.long)
        attn = torch.ones(B, shared + S, dtype=torch.long)
        attn[:, shared:] = 0
        for b, r in enumerate(rests):
            ids[b, S - len(r):] = torch.tensor(r)
            attn[b, shared + S - len(r):] = 1
        positions = (attn.cumsum(1) - 1).clamp(min=0)[:, shared:]
        kwargs: dict[str, Any] = {}
        if shared:
            head = lm.model(input_ids=torch.tensor([prompt_ids[0][:shared]], device=dev), use_cache=True,
                            **self._last_logits)
            cache = output_cache(head)
            if not all(type(layer) is DynamicLayer for layer in getattr(cache, "layers", [None])):
                # a sliding-window, recurrent or hybrid cache: no padding between the prefix and the rows
                return self._prefill(prompt_ids, share=False)
            cache.batch_repeat_interleave(B)
            kwargs[self._cache_kw] = cache
        out = lm.model(input_ids=ids.to(dev), attention_mask=attn.to(dev), position_ids=positions.to(dev),
                       use_cache=True, **kwargs, **self._last_logits)
        return out, attn

    @torch.no_grad()
    def distributions(self, judge_prompts: Sequence[str]) -> list[ScoreDistribution]:
        """P(k) for every k in 0..100 for several filled rubrics at once (two forward passes for the batch, plus
        one for the prefix they share).

        The prompts go through one prefill (see :meth:`_prefill`). Every distinct non-empty prefix of the numbers' token
        sequences is one node of a token tree; all nodes of all prompts then go through the model in ONE pass on
        top of the prefill's KV cache, each attending to its own prompt and its own ancestors only (a tree
        attention mask), at the position its depth gives it. Padding is masked out exactly, so a batch gives each
        prompt what it gets alone.
        """
        lm = self.lm
        prompts = [format_chat(lm.tokenizer, p) for p in judge_prompts]
        encs = encode_pairs(lm.tokenizer, prompts, ["0"] * len(prompts))
        prompt_ids = [e.ids[: e.n_prompt] for e in encs]
        numbers = [self._number_tokens(p) for p in prompts]
        out, attn = self._prefill(prompt_ids)
        B, T = attn.shape
        dev = lm.device
        first = out.logits[:, -1].float().log_softmax(-1)  # [B, vocab]: right after each prompt
        nodes = [sorted({seq[:i] for seq in nums for i in range(1, len(seq) + 1)}, key=lambda p: (len(p), p))
                 for nums in numbers]
        n = max(len(x) for x in nodes)
        allowed = torch.zeros(B, 1, n, T + n, dtype=torch.bool)
        tree_ids = torch.full((B, n), pad_token_id(lm.tokenizer), dtype=torch.long)
        tree_pos = torch.zeros(B, n, dtype=torch.long)
        for b, row_nodes in enumerate(nodes):
            where = {p: i for i, p in enumerate(row_nodes)}
            n_prompt = len(prompt_ids[b])
            allowed[b, 0, :, :T] = attn[b].bool()
            for i, p in enumerate(row_nodes):
                tree_ids[b, i] = p[-1]
                tree_pos[b, i] = n_prompt + len(p) - 1
                for j in range(1, len(p) + 1):
                    allowed[b, 0, i, T + where[p[:j]]] = True
            allowed[b, 0, len(row_nodes):, T:] = torch.eye(n, dtype=torch.bool)[len(row_nodes):]  # padding nodes
        # an additive mask in the model's dtype (0 where allowed, the most negative number elsewhere): every
        # attention implementation adds a float 4-D mask, whereas eager attention would ADD a bool one as 0/1
        mask = torch.zeros(allowed.shape, dtype=lm.dtype).masked_fill_(~allowed, torch.finfo(lm.dtype).min)
        logits = lm.model(input_ids=tree_ids.to(dev), position_ids=tree_pos.to(dev), attention_mask=mask.to(dev),
                          use_cache=True, **{self._cache_kw: output_cache(out)}).logits.float().log_softmax(-1)
        results = []
        for b in range(B):
            # row 0: the distribution right after the prompt; row 1 + i: after node i. Every number needs the
            # log-prob of each of its tokens (one gather) and the chance of stopping after its last token (one
            # reduction), so the device is read once per prompt, not once per number.
            rows = torch.cat([first[b].unsqueeze(0), logits[b, : len(nodes[b])]])
            row = {(): 0, **{p: i + 1 for i, p in enumerate(nodes[b])}}
            seqs = numbers[b]
            steps = [(k, row[seq[:i]], t) for k, seq in enumerate(seqs) for i, t in enumerate(seq)]
            step_lp = rows[torch.tensor([r for _, r, _ in steps], device=rows.device),
                           torch.tensor([t for _, _, t in steps], device=rows.device)]
            lp = torch.zeros(len(seqs), dtype=torch.float64, device=rows.device).index_add_(
                0, torch.tensor([k for k, _, _ in steps], device=rows.device), step_lp.double())
            stop = 1.0 - self._continue_mass(rows[torch.tensor([row[seq] for seq in seqs], device=rows.device)])
            p_k = (lp.exp() * stop.double().clamp(min=0.0)).tolist()
            results.append(ScoreDistribution(dict(zip(SCORES, p_k))))
        return results

    def score(self, prompts: Sequence[str], progress: bool | str = False,
              on_result: Callable[[int, float | None], None] | None = None) -> list[float | None]:
        """Expected scores, ``batch_size`` prompts per forward pass; ``on_result`` is told each score as its batch
        finishes."""
        prompts = check_prompts(prompts)
        desc = progress if isinstance(progress, str) else "judging"
        out: list[float | None] = [None] * len(prompts)
        # in text order a batch holds one rubric (and mostly one question): its shared prefix is computed once
        order = sorted(range(len(prompts)), key=lambda i: prompts[i])
        with tqdm(total=len(prompts), desc=desc, disable=not progress, unit="prompt") as bar:
            for idx in (order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)):
                for i, dist in zip(idx, self.distributions([prompts[i] for i in idx])):
                    out[i] = dist.expected(self.min_mass)
                    if on_result is not None:
                        on_result(i, out[i])
                bar.update(len(idx))
        return out
