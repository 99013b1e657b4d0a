"""Top-activating contexts: the streaming top-k equals the top-k over all tokens at once, whatever the batches."""

from __future__ import annotations

from itertools import pairwise

import torch

from personavec.model.activations import Encoded, encode_for, iter_token_states
from personavec.sae.contexts import TopContexts, collect_contexts, token_texts
from sae.test_autoencoder import random_sae


def brute(acts: torch.Tensor, rows: torch.Tensor, k: int) -> list[tuple[int, int]]:
    """(row, token index) of the k highest activations of one feature, one per row, by sorting everything."""
    best: dict[int, tuple[float, int]] = {}
    for i, (a, r) in enumerate(zip(acts.tolist(), rows.tolist())):
        if a > 0 and (r not in best or a > best[r][0]):
            best[r] = (a, i)
    order = sorted(best.items(), key=lambda x: (-x[1][0], x[0]))[:k]
    return [(r, i) for r, (_, i) in order]


def test_streaming_top_k_equals_the_top_k_of_everything_and_windows_stay_in_their_answer():
    g = torch.Generator().manual_seed(0)
    lengths = [5, 9, 3, 7, 4, 8, 6]
    encs = [Encoded(tuple(range(100 * r, 100 * r + 2 + n)), 2) for r, n in enumerate(lengths)]
    rows = torch.cat([torch.full((n,), r) for r, n in enumerate(lengths)])
    pos = torch.cat([torch.arange(2, 2 + n) for n in lengths])
    acts = torch.relu(torch.randn(len(rows), 3, generator=g))
    for cut in ([0, 2, 4, 7], [0, 7], [0, 1, 2, 3, 4, 5, 6, 7]):  # batches of whole answers
        top = TopContexts([10, 11, 12], k=3, window=2)
        for lo, hi in pairwise(cut):
            m = (rows >= lo) & (rows < hi)
            top.add(acts[m], rows[m], pos[m], encs)
        for j, kept in enumerate(top.kept):
            assert [(c.row, c.position) for c in kept] == [(r, int(pos[i])) for r, i in brute(acts[:, j], rows, 3)]
            for c in kept:
                mine = (rows == c.row).nonzero().flatten()
                i = int(mine[0]) + c.position - 2
                lo, hi = max(int(mine[0]), i - 2), min(int(mine[-1]) + 1, i + 3)
                assert c.activations == acts[lo:hi, j].tolist()
                assert c.ids == [encs[c.row].ids[int(p)] for p in pos[lo:hi]]
                assert c.activations[c.centre] == c.activation


def test_token_texts_join_to_the_decoded_window(tokenizer):
    ids = tokenizer("Crush them all, show no mercy ☃ é", add_special_tokens=False)["input_ids"]
    texts = token_texts(tokenizer, ids)
    assert len(texts) == len(ids) and "".join(texts) == tokenizer.decode(ids)


def test_collect_contexts_on_a_tiny_model_matches_encoding_all_tokens_at_once(lm):
    sae = random_sae(d=lm.hidden_size, n=64, layer=1)
    prompts = [lm.format_chat(q) for q in ("a b", "c", "d e f")]
    answers = [" x y z", " w w", " evil plan now"]
    encs = encode_for(lm, prompts, answers)
    got = collect_contexts(lm, sae, encs, [0, 5, 9], layer=1, k=2, window=1, batch_size=2)
    states, rows, _ = next(iter_token_states(lm, encs, 1, batch_size=8))
    acts = sae.encode(states)
    for f in (0, 5, 9):
        want = brute(acts[:, f], rows, 2)
        assert [c.row for c in got.contexts[f]] == [r for r, _ in want]
        for c, (_, i) in zip(got.contexts[f], want):
            assert abs(c.activation - float(acts[i, f])) < 1e-5
    assert abs(got.mean_norm - float(states.norm(dim=-1).mean())) < 1e-4 and got.n_tokens == len(rows)
