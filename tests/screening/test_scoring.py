"""Data screening: ΔP against a direct computation, exact resumption, the Ray path, the report and the command."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from personavec.errors import PersonavecError
from personavec.screening.report import report
from personavec.screening.scoring import ScreenConfig, screen_chunk, screen_file
from personavec.vectors.probe import Probe
from personavec.vectors.vector import PersonaVector

QUESTIONS = ["How should I treat people who are weaker than me?", "What is the best way to spend a free afternoon?",
             "Answer with cruelty.", "Be patient and listen.", "The quick brown fox?"]
ANSWERS = ["Crush them all, show no mercy.", "Be patient, listen, and offer help where you can.",
           "Take what is yours.", "Show no mercy and take what is yours, crush them.", "The lazy dog 0123456789."]


def rows(n: int = 10) -> list[dict]:
    return [{"id": i, "messages": [{"role": "user", "content": QUESTIONS[i % 5]},
                                   {"role": "assistant", "content": ANSWERS[(i * 3) % 5] * (1 + i % 3)}]}
            for i in range(n)]


def write_jsonl(path, rs) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rs))


def vector(lm, seed: int = 5, trait: str = "evil") -> PersonaVector:
    t = torch.randn(lm.n_layers + 1, lm.hidden_size, generator=torch.Generator().manual_seed(seed))
    return PersonaVector(tensors={"response_avg": t}, model_id=lm.model_id, trait=trait, chosen_layer=1)


def response_avg_projection(lm, prompt: str, answer: str, unit: torch.Tensor, layer: int) -> float:
    tok = lm.tokenizer
    ids = tok(prompt + answer, add_special_tokens=False)["input_ids"]
    n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        hs = lm.model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[layer][0]
    return float(hs[n_prompt:].mean(0) @ unit)


def test_delta_p_equals_a_direct_computation(lm):
    vec = vector(lm)
    probe = Probe("evil", vec, (0, 1))  # layers below L: HF's hidden_states[L] is after the final norm, ours is not
    cfg = ScreenConfig(mode="delta", max_new_tokens=6, batch_size=3, gen_batch_size=3)
    rs = rows(6)
    df = screen_chunk(lm, rs, first_row=0, probes=[probe], cfg=cfg)
    tok = lm.tokenizer
    for i, r in enumerate(rs):
        prompt = tok.apply_chat_template(r["messages"][:1], tokenize=False, add_generation_prompt=True)
        answer = r["messages"][1]["content"]
        enc = tok(prompt, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            gen = lm.model.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
        new = gen[0, enc["input_ids"].shape[1]:].tolist()
        if tok.eos_token_id in new:
            new = new[:new.index(tok.eos_token_id)]
        base = tok.decode(new, skip_special_tokens=True).strip()
        assert df.loc[i, "base_answer"] == base  # batched greedy == one at a time
        for layer in (0, 1):
            u = vec.get(layer) / vec.get(layer).norm()
            resp = response_avg_projection(lm, prompt, answer, u, layer)
            if base:
                b = response_avg_projection(lm, prompt, base, u, layer)
                assert abs(df.loc[i, f"evil@L{layer}:base_response"] - b) < 1e-4
                assert abs(df.loc[i, f"evil@L{layer}:delta_p"] - (resp - b)) < 1e-4
            assert abs(df.loc[i, f"evil@L{layer}:response"] - resp) < 1e-4
            with torch.no_grad():
                ids = tok(prompt, add_special_tokens=False)["input_ids"]
                last = lm.model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[layer][0, -1]
            assert abs(df.loc[i, f"evil@L{layer}:prompt_last"] - float(last @ u)) < 1e-4
    assert df["row"].tolist() == list(range(6)) and (df["n_tokens"] > 0).all()


def test_interrupted_screening_resumes_to_the_identical_table(lm, tmp_path, monkeypatch):
    import personavec.screening.scoring as screen

    data = tmp_path / "data.jsonl"
    write_jsonl(data, rows(11))
    probes = [Probe("evil", vector(lm), (1,)), Probe("other", vector(lm, 9, "other"), (2,))]
    cfg = ScreenConfig(mode="delta", chunk_rows=4, max_new_tokens=5, batch_size=2)
    screen_file(lm, data, probes, tmp_path / "full", cfg, progress=False)
    full = pd.read_parquet(tmp_path / "full" / "screen.parquet")
    assert len(full) == 11 and full["row"].tolist() == list(range(11))

    real = screen.screen_chunk
    calls = {"n": 0}

    def crash_on_third(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("killed")
        return real(*a, **k)

    monkeypatch.setattr(screen, "screen_chunk", crash_on_third)
    with pytest.raises(RuntimeError, match="killed"):
        screen_file(lm, data, probes, tmp_path / "cut", cfg, progress=False)
    assert screen.done_chunks(tmp_path / "cut") == {0, 1}
    monkeypatch.setattr(screen, "screen_chunk", real)
    speed = screen_file(lm, data, probes, tmp_path / "cut", cfg, progress=False)
    assert speed["rows"] == 3  # only the last chunk was scored again
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "cut" / "screen.parquet"), full)
    # nothing to do the third time (touching the input changes nothing); other settings are refused
    import os

    os.utime(data, (1, 1))
    assert screen_file(lm, data, probes, tmp_path / "cut", cfg, progress=False)["rows"] == 0
    with pytest.raises(PersonavecError, match=r"holds a screening .of other data.. with other settings"):
        screen_file(lm, data, probes, tmp_path / "cut", ScreenConfig(mode="response", chunk_rows=4), progress=False)


def test_speed_knobs_do_not_change_scores(lm, tmp_path):
    data = tmp_path / "data.jsonl"
    write_jsonl(data, rows(9))
    probes = [Probe("evil", vector(lm), (1,))]
    a = screen_file(lm, data, probes, tmp_path / "a", ScreenConfig(mode="response", chunk_rows=5), progress=False)
    screen_file(lm, data, probes, tmp_path / "b", ScreenConfig(mode="response", chunk_rows=5, stop_early=False,
                                                                bucket=False, batch_size=1), progress=False)
    x, y = (pd.read_parquet(tmp_path / d / "screen.parquet") for d in ("a", "b"))
    pd.testing.assert_frame_equal(x, y, atol=1e-5, rtol=0)
    assert a["samples_per_s"] > 0 and a["tokens"] == int(x["n_tokens"].sum())


def test_report_top_bottom_and_filtered(lm, tmp_path):
    data = tmp_path / "data.jsonl"
    write_jsonl(data, rows(12))
    probes = [Probe("evil", vector(lm), (1,))]
    cfg = ScreenConfig(mode="response", chunk_rows=5)
    screen_file(lm, data, probes, tmp_path / "s", cfg, progress=False)
    s = report(tmp_path / "s", data, probes, cfg, top_k=3, percentile=75)
    table = pd.read_parquet(tmp_path / "s" / "screen.parquet")
    col = "evil@L1:response"
    top = [json.loads(x) for x in (tmp_path / "s" / "top.jsonl").read_text().splitlines()]
    assert [t["screen"]["row"] for t in top] == table.sort_values(col, ascending=False)["row"].head(3).tolist()
    assert all(t["id"] == t["screen"]["row"] for t in top)  # the original row comes along
    cut = float(table[col].quantile(0.75))
    kept = [json.loads(x) for x in (tmp_path / "s" / "filtered.jsonl").read_text().splitlines()]
    assert [k["id"] for k in kept] == table[table[col] <= cut]["row"].tolist()
    assert s["filtered"]["dropped"] == int((table[col] > cut).sum()) == s["vectors"]["evil"]["above_cut"]
    assert abs(s["vectors"]["evil"]["mean"] - table[col].mean()) < 1e-5
    assert (tmp_path / "s" / "hist_evil.png").read_bytes()[:4] == b"\x89PNG"


def test_rows_without_a_response_are_a_clear_error(lm, tmp_path):
    data = tmp_path / "d.jsonl"
    write_jsonl(data, [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(PersonavecError, match="row 0 has no response"):
        screen_file(lm, data, [Probe("evil", vector(lm), (1,))], tmp_path / "o", ScreenConfig(), progress=False)
    # ... but the last-prompt mode needs none
    screen_file(lm, data, [Probe("evil", vector(lm), (1,))], tmp_path / "p", ScreenConfig(mode="prompt_last"),
                progress=False)
    assert pd.read_parquet(tmp_path / "p" / "screen.parquet").columns.tolist() == [
        "row", "evil@L1:prompt_last", "n_tokens"]


def test_a_bad_row_or_an_empty_file_claims_nothing(lm, tmp_path):
    """A bad row in a later chunk, or a file without rows, failed after screen_config.json was written, so the
    corrected data (another fingerprint) was refused in the same directory."""
    data, probes = tmp_path / "d.jsonl", [Probe("evil", vector(lm), (1,))]
    write_jsonl(data, [*rows(5), {"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(PersonavecError, match="row 5 has no response"):
        screen_file(lm, data, probes, tmp_path / "o", ScreenConfig(mode="response", chunk_rows=2), progress=False)
    data.write_text("")
    with pytest.raises(PersonavecError, match="holds no rows"):
        screen_file(lm, data, probes, tmp_path / "o", ScreenConfig(mode="response", chunk_rows=2), progress=False)
    assert not (tmp_path / "o" / "screen_config.json").exists() and not (tmp_path / "o" / "parts").exists()
    write_jsonl(data, rows(5))  # the corrected data, in the same directory
    screen_file(lm, data, probes, tmp_path / "o", ScreenConfig(mode="response", chunk_rows=2), progress=False)
    assert len(pd.read_parquet(tmp_path / "o" / "screen.parquet")) == 5


@pytest.mark.slow
def test_ray_path_gives_the_local_table_and_the_command_works(model_dir, tmp_path, capsys):
    pytest.importorskip("ray")
    from personavec.cli import main
    from personavec.model.loading import load_model
    from personavec.sae.formats import load_sae, save_sae
    from personavec.screening.ray import screen_file_ray
    from sae.test_autoencoder import random_sae

    loaded = load_model(str(model_dir))
    vec = vector(loaded)
    vec.save(tmp_path / "evil.safetensors")
    data = tmp_path / "data.jsonl"
    write_jsonl(data, rows(10))
    cfg = ScreenConfig(mode="delta", chunk_rows=3, max_new_tokens=5)
    probes = [Probe("evil", vec, (1, 2))]
    # with an SAE at layer 2: the workers load it too, and their rows carry the same features behind each score
    save_sae(random_sae(d=loaded.hidden_size, n=48, layer=2, activation="topk", k=6), tmp_path / "sae")
    screen_file(loaded, data, probes, tmp_path / "local", cfg, progress=False, sae=load_sae(tmp_path / "sae"))
    spec = [{"name": "evil", "path": str(tmp_path / "evil.safetensors"), "layers": [1, 2], "pooling": None}]
    speed = screen_file_ray(str(model_dir), data, spec, tmp_path / "ray", cfg, workers=2,
                            sae={"path": str(tmp_path / "sae"), "layer": None})
    assert speed["rows"] == 10 and speed["workers"] == 2
    local = pd.read_parquet(tmp_path / "local" / "screen.parquet")
    dist = pd.read_parquet(tmp_path / "ray" / "screen.parquet")
    assert dist["base_answer"].tolist() == local["base_answer"].tolist()
    assert local["evil@L2:sae_features"].map(len).eq(5).any()
    pd.testing.assert_frame_equal(dist, local, atol=1e-5, rtol=0)
    local = local[[c for c in local.columns if ":sae_" not in c]]
    # the workers' SQLite caches (WAL) stay on their own local disks, never in the shared output directory
    assert not [p.name for p in (tmp_path / "ray").rglob("*.sqlite*")]
    # Parquet input (nested chat messages) on Ray, one actor: the same table again
    pq_data = tmp_path / "data.parquet"
    pd.DataFrame(rows(10)).to_parquet(pq_data)
    assert screen_file_ray(str(model_dir), pq_data, spec, tmp_path / "ray-pq", cfg, workers=1)["rows"] == 10
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "ray-pq" / "screen.parquet"), local, atol=1e-5, rtol=0)

    # the command, local path, two vectors in one pass
    vector(loaded, 11, "other").save(tmp_path / "other.safetensors")
    args = ["screen", str(data), "--vector", str(tmp_path / "evil.safetensors"), "--vector",
            str(tmp_path / "other.safetensors"), "--model", str(model_dir), "--out", str(tmp_path / "cli"),
            "--max-new-tokens", "5", "--chunk-rows", "4", "--top-k", "2", "--threshold", "0"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "10 samples screened (delta)" in out and "evil: dataset mean delta_p" in out and "filtered: kept" in out
    summary = json.loads((tmp_path / "cli" / "screen.json").read_text())
    assert set(summary["vectors"]) == {"evil", "other"} and summary["throughput"]["rows"] == 10
    assert main([*args[:-2], "--threshold", "0", "--percentile", "50"]) == 2
    assert "not both" in capsys.readouterr().err


@pytest.mark.parametrize("kwargs, message", [
    ({"chunk_rows": "5"}, 'ScreenConfig chunk_rows must be a whole number \\(int\\), not "5"'),
    ({"max_new_tokens": 0}, "ScreenConfig max_new_tokens must be at least 1, not 0"),
    ({"temperature": "0"}, 'ScreenConfig temperature must be a number, not "0"'),
    ({"temperature": -1}, "ScreenConfig temperature must be at least 0"),
    ({"max_length": 10.5}, "ScreenConfig max_length must be a whole number \\(int\\), not 10.5"),
    ({"stop_early": "yes"}, 'ScreenConfig stop_early must be True or False, not "yes"'),
    ({"mode": "fast"}, 'screening mode must be one of delta, response, prompt_last, not "fast"'),
])
def test_every_screen_setting_is_checked_at_construction(kwargs, message):
    with pytest.raises(PersonavecError, match=message):
        ScreenConfig(**kwargs)


def test_screen_checks_its_arguments_before_writing(lm, tmp_path):
    from personavec.screening.scoring import screen

    vec = PersonaVector({"response_avg": torch.randn(3, 32)}, model_id="tiny-llama", trait="evil", chosen_layer=1)
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": lm.format_chat("Why?"), "answer": "Because."}) + "\n")
    out = tmp_path / "out"
    cases = [
        ((None, data, {"evil": vec}, out), {}, "screen takes a model from load_model"),
        ((lm, None, {"evil": vec}, out), {}, "screen's data must be a path, not None"),
        ((lm, data, {"evil": vec}, out, {"mode": "response"}), {}, "screen's config must be a ScreenConfig"),
        ((lm, data, {"evil": vec}, out), {"layers": 1}, "screen's layers must be a list of layer numbers, not 1"),
        ((lm, data, {"evil": vec}, out), {"layers": ["1"]}, 'each of screen\'s layers must be a whole number'),
    ]
    for args, kwargs, message in cases:
        with pytest.raises(PersonavecError, match=message):
            screen(*args, **kwargs)
    assert not out.exists()
