"""Decomposing a persona vector into SAE features: the planted test, exact attribution through decompose on real
activations, the causal check, the files and the page, and one-line refusals of inputs that cannot meet."""

from __future__ import annotations

import json
from html.parser import HTMLParser

import pandas as pd
import pytest
import torch

from personavec.errors import PersonavecError
from personavec.sae.autoencoder import SparseAutoencoder
from personavec.sae.decomposition import (
    Corpus,
    DecomposeConfig,
    corpus_from_run,
    corpus_from_texts,
    decompose,
    write_decomposition,
)
from personavec.sae.intervention import CausalConfig
from personavec.vectors.vector import PersonaVector
from sae.test_autoencoder import random_sae


def vector_at(layer: int, direction: torch.Tensor, n_layers: int = 2, trait: str = "evil",
              resid_norm: float | None = 5.0) -> PersonaVector:
    t = torch.zeros(n_layers + 1, direction.numel())
    t[layer] = direction
    extra = {"resid_norm": [resid_norm] * (n_layers + 1)} if resid_norm else {}
    return PersonaVector(tensors={"response_avg": t}, model_id="tiny-llama", trait=trait, extra=extra)


def planted(d: int = 256, n: int = 1024, seed: int = 0) -> tuple[SparseAutoencoder, torch.Tensor]:
    """An SAE whose decoder rows have recorded (non-unit) norms, and a vector made of three of its unit rows."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.randn(n, d, generator=g)
    unit = rows / rows.norm(dim=-1, keepdim=True)
    norms = torch.rand(n, 1, generator=g) * 3 + 0.3  # ranking must use the unit rows, whatever the norms
    sae = SparseAutoencoder(W_enc=torch.randn(d, n, generator=g), b_enc=torch.zeros(n), W_dec=unit * norms,
                            b_dec=torch.zeros(d), layer=1)
    v = 3.0 * unit[17] + 2.0 * unit[901] - 2.5 * unit[444] + 0.05 * torch.randn(d, generator=g)
    return sae, v


def test_planted_features_come_first_with_the_right_signs():
    sae, v = planted()
    dec = decompose(vector_at(1, v), sae, cfg=DecomposeConfig(top=5, causal=0))
    assert dec.rankings["cosine_positive"][:2] == [17, 901]
    assert dec.rankings["cosine_negative"][:1] == [444]
    cos = dec.features.set_index("latent")["cosine"]
    assert cos[17] > cos[901] > 0 > cos[444]
    others = cos.drop([17, 901, 444]).abs().max()
    assert cos[901] > 2 * others  # the planted rows stand out, not by luck of the seed
    assert [c["latent"] for c in dec.cards[:2]] == [17, 901] and dec.cards[5]["latent"] == 444
    assert dec.attribution is None and dec.causal is None  # no model: the ranking alone
    # the encoder is never used: another encoder gives the same ranking
    other = SparseAutoencoder(W_enc=torch.randn(256, 1024), b_enc=torch.randn(1024), W_dec=sae.W_dec,
                              b_dec=sae.b_dec, layer=1)
    assert decompose(vector_at(1, v), other, cfg=DecomposeConfig(top=5, causal=0)).rankings == dec.rankings


PROMPTS = ["a b c", "d e", "f g h i j", "k", "l m", "n o p"]
ANSWERS = [" x y x y", " z z z", " w v u t", " s", " evil plan", " kind help"]
SIDES = ["pos", "pos", "pos", "neg", "neg", "neg"]


def tiny_corpus(lm) -> Corpus:
    prompts = [lm.format_chat(p) for p in PROMPTS]
    return Corpus(prompts=prompts, answers=ANSWERS, sides=SIDES, source="test answers",
                  questions=["How are you?", "Why?"])


@pytest.mark.parametrize("activation", ["relu", "topk"])
def test_attribution_terms_sum_to_the_projection_to_1e_4_through_decompose(lm, activation):
    d = lm.hidden_size
    kw = {"topk": dict(k=6)}.get(activation, {})
    sae = random_sae(d=d, n=64, activation=activation, layer=1, **kw)
    v = torch.randn(d, generator=torch.Generator().manual_seed(1))
    dec = decompose(vector_at(1, v), sae, lm, tiny_corpus(lm), DecomposeConfig(top=4, causal=0, contexts=2))
    t = dec.terms
    assert torch.allclose(t.features.sum(1) + t.bias + t.error, t.projection, atol=1e-4)
    att = dec.attribution
    for side in ("pos", "neg", "all"):
        s = att[side]
        assert abs(s["features"] + s["bias"] + s["error"] - s["projection"]) < 1e-4
        assert s["max_residual"] < 1e-4
    gap = att["gap"]
    assert abs(gap["features"] + gap["error"] - gap["projection"]) < 1e-4
    table = dec.features
    assert abs(table["gap"].sum() - gap["features"]) < 1e-6  # the features' shares add up to their part of the gap
    assert abs(table["gap_share"].sum() + gap["error_share"] - 1) < 1e-4
    assert dec.rankings["gap"][0] == int(table["gap"].idxmax())
    assert table["firing_rate"].between(0, 1).all()
    assert dec.source["n_pos"] == 3 and dec.source["n_neg"] == 3


def test_contexts_and_the_page_show_where_each_listed_feature_fires(lm, tmp_path):
    d = lm.hidden_size
    sae = random_sae(d=d, n=64, layer=1)
    v = torch.randn(d, generator=torch.Generator().manual_seed(2))
    dec = decompose(vector_at(1, v), sae, lm, tiny_corpus(lm), DecomposeConfig(top=3, causal=0, contexts=2, window=3))
    fired = [c for c in dec.cards if c["contexts"]]
    assert fired
    for card in fired:
        acts = [c["activation"] for c in card["contexts"]]
        assert acts == sorted(acts, reverse=True) and len({c["row"] for c in card["contexts"]}) == len(acts)
        for c in card["contexts"]:
            assert c["activations"][c["centre"]] == c["activation"] == max(c["activations"])
            assert c["side"] == SIDES[c["row"]]
    paths = write_decomposition(dec, tmp_path / "out", command="personavec decompose test")
    doc = json.loads(paths["json"].read_text())
    assert doc["rankings"]["cosine_positive"] == dec.rankings["cosine_positive"]
    assert len(pd.read_parquet(paths["table"])) == 64
    spans = page_spans(paths["page"].read_text())
    card = fired[0]
    mine = spans[card["latent"]]
    ctx = card["contexts"][0]
    assert [t for t, _, _ in mine[: len(ctx["tokens"])]] == ctx["tokens"]
    for (_, act, classes), want in zip(mine, ctx["activations"]):
        assert float(act) == pytest.approx(want, rel=1e-3, abs=1e-6)
        assert ("fires" in classes) == (want > 0)  # highlighted exactly where the feature fires
    assert sum("centre" in cls for _, _, cls in mine[: len(ctx["tokens"])]) == 1


def page_spans(html: str) -> dict[int, list[tuple[str, str, str]]]:
    """{feature: [(token text, data-act, class)]} of the token spans in each feature card (parsed, unescaped)."""
    class P(HTMLParser):
        def __init__(self):
            super().__init__()
            self.card, self.tok, self.out = None, None, {}

        def handle_starttag(self, tag, attrs):
            a = dict(attrs)
            if tag == "div" and (a.get("id") or "").startswith("feature-"):
                self.card = int(a["id"].split("-")[1])
                self.out[self.card] = []
            if tag == "span" and "tok" in (a.get("class") or "").split():
                self.tok = [a.get("data-act"), a.get("class"), ""]

        def handle_data(self, data):
            if self.tok is not None:
                self.tok[2] += data

        def handle_endtag(self, tag):
            if tag == "span" and self.tok is not None:
                self.out[self.card].append((self.tok[2], self.tok[0], self.tok[1]))
                self.tok = None

    p = P()
    p.feed(html)
    return p.out


def test_the_page_escapes_text_from_the_corpus(lm, tmp_path):
    from personavec.sae.page import render_page

    doc = {"vector": {"trait": "<b>evil</b>"}, "layer": 1, "sae": {"describe": "x"},
           "cards": [{"latent": 3, "cosine": 0.5, "section": "cosine_positive", "ranks": ["cosine +#1"],
                      "contexts": [{"activation": 2.0, "row": 0, "side": "pos", "centre": 0,
                                    "tokens": ["<script>alert(1)</script>"], "activations": [2.0]}]}]}
    html = render_page(doc)
    assert "<script>alert" not in html and "&lt;script&gt;" in html and "<b>evil" not in html
    assert page_spans(html)[3] == [("<script>alert(1)</script>", "2", "tok fires centre")]


def test_causal_check_compares_each_row_with_the_unsteered_answers(lm):
    d = lm.hidden_size
    sae = random_sae(d=d, n=64, layer=1)
    v = torch.randn(d, generator=torch.Generator().manual_seed(3))
    cfg = DecomposeConfig(top=3, causal=2, causal_config=CausalConfig(coef=0.5, n_questions=2, max_new_tokens=6))
    dec = decompose(vector_at(1, v), sae, lm, tiny_corpus(lm), cfg)
    c = dec.causal
    checked = [f"feature {i}" for i in dec.rankings["cosine_positive"][:2]]
    assert list(c["conditions"]) == ["unsteered", "vector", *checked]
    base = c["conditions"]["unsteered"]
    assert base["n"] == 2 and base["projection_effect"]["mean"] == 0.0
    assert c["settings"]["raw_coef"] == pytest.approx(0.5 * 5.0)
    assert c["settings"]["questions"] == ["How are you?", "Why?"]
    for r in c["conditions"].values():
        assert r["projection"]["n"] == 2 and r["fluency_effect"]["n"] == 2
        assert r["trait"]["mean"] is None  # no judge given
    # unsteered answers are the engine's greedy answers, and a steered condition's projection effect is its own
    # mean minus the unsteered mean (paired by question)
    answers = pd.DataFrame(c["answers"])
    assert len(answers) == 2 * 4
    feat = f"feature {dec.rankings['cosine_positive'][0]}"
    own = answers[answers["condition"] == feat]["projection"].mean()
    unst = answers[answers["condition"] == "unsteered"]["projection"].mean()
    assert c["conditions"][feat]["projection_effect"]["mean"] == pytest.approx(own - unst, abs=1e-9)
    card = dec.cards[0]
    assert card["causal"] == c["conditions"][feat]
    assert dec.features.loc[card["latent"], "causal_projection_effect"] == pytest.approx(own - unst, abs=1e-9)


@pytest.mark.parametrize("case, message", [
    ("width", "SAE reads vectors of size 34"),
    ("layer", "the SAE reads layer 3 but the evil vector has layers 0..2"),
    ("zero", "the SAE reads layer 2, but the evil vector has no direction at layer 2"),
    ("no_layer", "give --layer"),
    ("other_layer", "the SAE reads layer 1, not --layer 2"),
])
def test_inputs_that_cannot_meet_are_refused_in_one_line(case, message):
    v = torch.randn(32)
    vec = vector_at(1, v)
    sae, cfg = {"width": (random_sae(d=34, layer=1), None), "layer": (random_sae(d=32, layer=3), None),
                "zero": (random_sae(d=32, layer=2), None), "no_layer": (random_sae(d=32), None),
                "other_layer": (random_sae(d=32, layer=1), 2)}[case]
    with pytest.raises(PersonavecError, match=message) as e:
        decompose(vec, sae, cfg=DecomposeConfig(layer=cfg, causal=0))
    assert "\n" not in str(e.value)


def test_a_run_directory_gives_its_held_out_answers_and_texts_need_a_text_column(lm, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    df = pd.DataFrame({"set": ["extract", "extract", "eval", "eval"], "side": ["pos", "neg", "pos", "neg"],
                       "prompt": ["p1", "p2", "p3", "p4"], "answer": ["a1", "a2", "a3", "a4"]})
    df.to_parquet(run / "judged.parquet")
    (run / "artifacts.json").write_text(json.dumps({"evaluation_questions": ["Q1?", "Q2?"], "rubric": "{question}"
                                                    "{answer}"}))
    c = corpus_from_run(run)
    assert c.answers == ["a3", "a4"] and c.sides == ["pos", "neg"] and "held-out" in c.source
    assert c.questions == ["Q1?", "Q2?"] and c.rubric == "{question}{answer}"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"score": 1}\n')
    with pytest.raises(PersonavecError, match="has no text column"):
        corpus_from_texts(bad, lm)
    ok = tmp_path / "ok.jsonl"
    ok.write_text('{"question": "Hi?", "answer": "hello", "side": "pos"}\n{"text": "plain", "side": "neg"}\n')
    c = corpus_from_texts(ok, lm)
    assert c.answers == ["hello", "plain"] and c.sides == ["pos", "neg"] and c.prompts[0] == lm.format_chat("Hi?")
    with pytest.raises(PersonavecError, match=r"holds no judged\.parquet"):
        corpus_from_run(tmp_path)
