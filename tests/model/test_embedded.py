"""Slow end-to-end checks on the embedded SmolLM2-135M-Instruct (offline; run in CI)."""

from __future__ import annotations

import json
from importlib import resources

import pytest
import torch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm(tmp_path_factory):
    import os

    os.environ["HF_HUB_OFFLINE"] = "1"
    from personavec.model.loading import load_model

    return load_model("smollm2-135m", device="cpu", dtype="float32")


def _demo_rows(name):
    path = resources.files("personavec") / "data" / "demo" / name
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_embedded_model_loads_offline_from_the_dequantized_cache(smollm):
    assert smollm.source == "embedded" and smollm.model_id == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert smollm.revision.startswith("gguf-sha256:")
    assert smollm.n_layers == 30 and smollm.hidden_size == 576
    assert "<|im_start|>assistant" in smollm.format_chat("Hi")


def test_extract_from_small_table_and_held_out_separation(smollm):
    import pandas as pd

    from personavec.model.activations import encode_pairs, iter_pooled
    from personavec.vectors.extraction import extract_vector
    from personavec.vectors.tables import prompts_and_answers

    pos, neg = pd.DataFrame(_demo_rows("evil_pos.jsonl")), pd.DataFrame(_demo_rows("evil_neg.jsonl"))
    train, held = list(range(12)), list(range(12, 16))
    vec = extract_vector(smollm, pos.iloc[train], neg.iloc[train], trait="evil", batch_size=8)
    assert vec.n_layers == 30 and vec.hidden_size == 576 and vec.counts["kept"] == 12
    assert all(torch.isfinite(t).all() for t in vec.tensors.values())
    # held-out pairs: each pos answer projects higher on the vector than its paired neg answer
    layer = 12
    unit = vec.get(layer) / vec.get(layer).norm()
    proj = {}
    for side, df in (("pos", pos.iloc[held]), ("neg", neg.iloc[held])):
        prompts, answers = prompts_and_answers(df, smollm.tokenizer)
        encs = encode_pairs(smollm.tokenizer, prompts, answers)
        vals = torch.zeros(len(encs))
        for idx, pooled in iter_pooled(smollm, encs, [layer], ["response_avg"], batch_size=4):
            vals[idx] = pooled["response_avg"][:, 0] @ unit
        proj[side] = vals
    assert (proj["pos"] > proj["neg"]).all(), proj


def test_batched_equals_unbatched_on_the_real_model(smollm):
    import pandas as pd

    from personavec.model.activations import pooled_means
    from personavec.vectors.tables import prompts_and_answers

    prompts, answers = prompts_and_answers(pd.DataFrame(_demo_rows("evil_pos.jsonl")[:4]), smollm.tokenizer)
    batched = pooled_means(smollm, prompts, answers, layers=[0, 10, 30], batch_size=4, padding_side="left")
    singles = [pooled_means(smollm, [p], [a], layers=[0, 10, 30], batch_size=1) for p, a in zip(prompts, answers)]
    for pooling in batched.means:
        ref = torch.stack([s.means[pooling] for s in singles]).mean(0)
        torch.testing.assert_close(batched.means[pooling], ref, rtol=1e-3, atol=1e-3)


def test_steering_raises_the_projection_of_generated_answers_monotonically(smollm):
    """Steer with the demo 'evil' vector at layer 12; project the answers (read by the unsteered model) on v̂."""
    from personavec.engine.sampling import SamplingConfig, generate
    from personavec.model.activations import encode_pairs, iter_pooled
    from personavec.model.edits import add_vector
    from personavec.run.artifacts import builtin
    from personavec.vectors.extraction import extract_vector

    data = resources.files("personavec") / "data" / "demo"
    vec = extract_vector(smollm, str(data / "evil_pos.jsonl"), str(data / "evil_neg.jsonl"), trait="evil",
                         layers=[12])
    layer = 12
    v = vec.get(layer)
    unit = v / v.norm()
    prompts = [smollm.format_chat(q) for q in builtin("evil").evaluation_questions[:8]]
    greedy = SamplingConfig(n_samples=1, max_new_tokens=32, temperature=0.0)
    means = []
    for coef in (0.0, 1.0, 2.0):
        with add_vector(smollm, v, layer, coef, positions="response"):
            answers = [r["answer"] or "." for r in generate(smollm, prompts, greedy)]
        encs = encode_pairs(smollm.tokenizer, prompts, answers)
        proj = torch.cat([p["response_avg"][:, 0] @ unit for _, p in iter_pooled(smollm, encs, [layer],
                                                                                  ["response_avg"], batch_size=8)])
        means.append(float(proj.mean()))
    assert means[0] < means[1] < means[2], means
