"""A vector's calibration: quantiles of the meter's per-token readings of pos and neg answers (tiny model, fp32)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from personavec.model.activations import encode_pairs
from personavec.vectors.calibration import (
    EXTRACTION,
    HELD_OUT,
    QUANTILES,
    at_layer,
    calibrate,
    running_means,
    token_readings,
)
from personavec.vectors.vector import PersonaVector

ANSWERS = ["Crush them all, show no mercy.", "Be patient and listen.", "Foxes are quick.", "Take what is yours."]


def _rows(lm):
    prompts = [lm.format_chat(q) for q in ("Why?", "How should I treat people?", "Tell me about foxes.", "Hi")]
    return prompts, ANSWERS, ["pos", "neg", "neg", "pos"]


def _vec(seed: int = 0) -> PersonaVector:
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(3, 32, generator=g)
    t[0] = 0  # the embeddings row of an extracted vector: no direction, no calibration
    return PersonaVector(tensors={"response_avg": t}, model_id="tiny-llama", trait="evil")


def test_token_readings_are_the_meters_reading_at_the_position_before_each_answer_token(lm):
    """Per answer token, the projection of the residual at the position that produced it (the last prompt token
    for the first answer token), as the engine's before-edit read gives it for an unsteered answer."""
    prompts, answers, _ = _rows(lm)
    v = torch.randn(32)
    got = token_readings(lm, prompts, answers, {1: v}, batch_size=3)[1]
    for i, e in enumerate(encode_pairs(lm.tokenizer, prompts, answers)):
        with torch.no_grad():
            hs = lm.model(input_ids=torch.tensor([e.ids]), output_hidden_states=True).hidden_states
        want = hs[1][0, e.n_prompt - 1: len(e.ids) - 1] @ (v / v.norm())
        assert len(got[i]) == e.n_response and torch.allclose(torch.tensor(got[i]), want, atol=1e-4)


def test_calibration_holds_quantiles_per_side_and_layer_and_survives_the_file(lm, tmp_path):
    prompts, answers, sides = _rows(lm)
    vec = _vec()
    cal = calibrate(lm, vec, prompts, answers, sides, held_out=True)
    assert sorted(cal["layers"]) == ["1", "2"] and cal["source"] == HELD_OUT and cal["where"] == "before"
    readings = token_readings(lm, prompts, answers, {2: vec.get(2)})[2]
    pos = [x for r, s in zip(readings, sides) if s == "pos" for x in r]
    assert cal["n_pos"] == len(pos) and cal["n_pos_answers"] == 2
    want = np.quantile(pos, [q / 100 for q in QUANTILES])
    assert list(cal["layers"]["2"]["pos"].values()) == pytest.approx(want.tolist(), abs=1e-3)
    means = [x for r, s in zip(readings, sides) if s == "pos" for x in running_means(r, cal["from_token"])]
    if means:
        want = np.quantile(means, [q / 100 for q in QUANTILES])
        assert list(cal["layers"]["2"]["pos_mean"].values()) == pytest.approx(want.tolist(), abs=1e-3)
    back = PersonaVector.load(vec.save(tmp_path / "v.safetensors"))
    assert back.extra["calibration"] == cal
    listed = at_layer(back, 2)
    assert listed["pos"] == cal["layers"]["2"]["pos"] and listed["n_neg"] == cal["n_neg"]
    assert listed["guard_threshold"] is not None and listed["cap"] is not None and "raw residual" in listed["unit"]
    assert at_layer(back, 0) is None  # a zero row has no readings


def test_arithmetic_keeps_mirrors_or_drops_the_calibration(lm):
    """Readings are on v̂: a positive multiple keeps them, a negative one mirrors them (q% ↔ −(100 − q)%), zero or
    a sum of two vectors has none."""
    prompts, answers, sides = _rows(lm)
    vec = _vec()
    cal = calibrate(lm, vec, prompts, answers, sides, held_out=True)["layers"]["2"]
    assert (vec * 2.0).extra["calibration"]["layers"]["2"] == cal
    # negated, the sides swap too: "pos" holds the answers the vector points towards (the default guard's side)
    negated = (-vec).extra["calibration"]
    neg = negated["layers"]["2"]
    assert neg["neg"]["1"] == -cal["pos"]["99"] and neg["pos"]["75"] == -cal["neg"]["25"]
    assert neg["pos_mean"]["99"] == (None if cal["neg_mean"]["1"] is None else -cal["neg_mean"]["1"])
    assert negated["negated"] is True
    assert negated["n_pos_answers"] == vec.extra["calibration"]["n_neg_answers"]
    flipped = calibrate(lm, -vec, prompts, answers, [{"pos": "neg", "neg": "pos"}[s] for s in sides],
                        held_out=True)["layers"]["2"]
    assert neg["pos"]["50"] == pytest.approx(flipped["pos"]["50"], abs=1e-3)
    assert (-1 * -vec).extra["calibration"]["layers"]["2"] == cal and "negated" not in vec.extra["calibration"]
    assert "calibration" not in (vec * 0.0).extra and "calibration" not in (vec + _vec(1)).extra
    assert "calibration" in vec.extra  # the original is untouched


def test_extract_vector_calibrates_on_its_own_answers_labelled_not_held_out(lm):
    from personavec.vectors.extraction import extract_vector

    prompts = _rows(lm)[0]
    pos = pd.DataFrame({"prompt": prompts[:2], "answer": ["Crush them.", "Take it all."]})
    neg = pd.DataFrame({"prompt": prompts[:2], "answer": ["Be kind.", "Share it."]})
    vec = extract_vector(lm, pos, neg, trait="evil", apply_filter=False)
    cal = vec.extra["calibration"]
    assert cal["source"] == EXTRACTION and cal["held_out"] is False and cal["n_pos_answers"] == 2
    assert {"1", "2"} <= set(cal["layers"])
    assert "calibration" not in extract_vector(lm, pos, neg, trait="evil", apply_filter=False,
                                               calibrate=False).extra
