"""SAE attribution of screening scores: the listed features, the rest, the bias and the error add up to each row's
score exactly; refusals come before anything runs."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from personavec.errors import PersonavecError
from personavec.screening.report import report
from personavec.screening.scoring import ScreenConfig, screen_chunk, screen_file
from personavec.vectors.probe import Probe
from sae.test_autoencoder import random_sae
from screening.test_scoring import rows, vector, write_jsonl


def _sae(lm, layer: int = 1, **kw):
    return random_sae(d=lm.hidden_size, n=48, layer=layer, activation="topk", k=6, **kw)


def _accounted(df: pd.DataFrame, prefix: str, score: str) -> np.ndarray:
    parts = np.array([sum(t) for t in df[f"{prefix}:sae_terms"]]) + df[f"{prefix}:sae_rest"] + \
        df[f"{prefix}:sae_bias"] + df[f"{prefix}:sae_error"]
    return np.abs(parts.to_numpy() - df[f"{prefix}:{score}"].to_numpy())


@pytest.mark.parametrize("mode, score", [("delta", "delta_p"), ("response", "response")])
def test_features_rest_bias_and_error_sum_to_each_rows_score(lm, mode, score):
    probe = Probe("evil", vector(lm), (0, 1))
    cfg = ScreenConfig(mode=mode, max_new_tokens=6, batch_size=3, gen_batch_size=3)
    df = screen_chunk(lm, rows(6), 0, [probe], cfg, sae=_sae(lm))
    assert "evil@L0:sae_features" not in df.columns  # only the SAE's layer is explained
    ok = df[f"evil@L1:{score}"].notna()
    assert ok.any() and (_accounted(df[ok], "evil@L1", score) < 1e-4).all()
    for feats, terms in zip(df.loc[ok, "evil@L1:sae_features"], df.loc[ok, "evil@L1:sae_terms"]):
        assert len(feats) == 5 and len(set(feats)) == 5 and list(terms) == sorted(terms, reverse=True)
    if mode == "delta":
        assert (df.loc[ok, "evil@L1:sae_bias"] == 0).all()  # the bias cancels in a difference
    # the scores themselves do not change when an SAE explains them
    plain = screen_chunk(lm, rows(6), 0, [probe], cfg)
    pd.testing.assert_series_equal(df[f"evil@L1:{score}"], plain[f"evil@L1:{score}"])


def test_the_features_reach_the_table_and_top_jsonl_and_the_sae_is_part_of_the_claimed_settings(lm, tmp_path):
    data = tmp_path / "data.jsonl"
    write_jsonl(data, rows(8))
    probe = Probe("evil", vector(lm), (1,))
    cfg = ScreenConfig(mode="delta", max_new_tokens=5, chunk_rows=4)
    out = tmp_path / "out"
    sae = _sae(lm)
    screen_file(lm, data, [probe], out, cfg, progress=False, sae=sae)
    table = pd.read_parquet(out / "screen.parquet")
    assert len(table) == 8 and (_accounted(table.dropna(subset=["evil@L1:delta_p"]), "evil@L1", "delta_p") < 1e-4).all()
    report(out, data, [probe], cfg, top_k=3)
    first = pd.read_json(out / "top.jsonl", lines=True).iloc[0]["screen"]
    assert len(first["evil@L1:sae_features"]) == 5 and len(first["evil@L1:sae_terms"]) == 5
    with pytest.raises(PersonavecError, match="settings"):
        screen_file(lm, data, [probe], out, cfg, progress=False, sae=_sae(lm, seed=1, apply_b_dec_to_input=False))


@pytest.mark.parametrize("change, message", [
    (dict(mode="prompt_last"), "prompt_last has none"),
    (dict(layer=0), "reads layer 0 but the vectors are screened at layer"),
    (dict(width=3), "hidden size"),
])
def test_an_sae_that_cannot_explain_the_scores_is_refused_before_anything_is_written(lm, tmp_path, change, message):
    data = tmp_path / "data.jsonl"
    write_jsonl(data, rows(4))
    sae = random_sae(d=lm.hidden_size + change.get("width", 0), n=16, layer=change.get("layer", 1))
    cfg = ScreenConfig(mode=change.get("mode", "delta"), max_new_tokens=4)
    with pytest.raises(PersonavecError, match=message):
        screen_file(lm, data, [Probe("evil", vector(lm), (1,))], tmp_path / "out", cfg, progress=False, sae=sae)
    assert not (tmp_path / "out").exists()


def test_the_command_takes_an_sae_and_refuses_a_layer_without_it_or_against_it_also_on_ray(model_dir, tmp_path, capsys):
    from personavec.cli import main
    from personavec.model.loading import load_model
    from personavec.sae.formats import save_sae

    loaded = load_model(str(model_dir), dtype="float32")
    vector(loaded).save(tmp_path / "evil.safetensors")
    save_sae(_sae(loaded), tmp_path / "sae")
    data = tmp_path / "data.jsonl"
    write_jsonl(data, rows(4))
    base = ["screen", str(data), "--vector", str(tmp_path / "evil.safetensors"), "--model", str(model_dir),
            "--dtype", "float32", "--max-new-tokens", "4", "--top-k", "2"]
    assert main([*base, "--out", str(tmp_path / "cli"), "--sae", str(tmp_path / "sae")]) == 0
    table = pd.read_parquet(tmp_path / "cli" / "screen.parquet")
    assert (_accounted(table.dropna(subset=["evil@L1:delta_p"]), "evil@L1", "delta_p") < 1e-4).all()
    capsys.readouterr()
    for extra, message in ((["--sae-layer", "1"], "give --sae too"),
                           (["--sae", str(tmp_path / "sae"), "--sae-layer", "2", "--ray"], "is for layer 1")):
        assert main([*base, "--out", str(tmp_path / "bad"), *extra]) == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / "bad").exists()
