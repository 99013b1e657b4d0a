"""`personavec decompose` on a tiny model directory end to end, and its one-line refusals of bad input."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

from personavec.cli import main
from sae.test_autoencoder import random_sae


def write_sae(sae, directory) -> None:
    """An SAE on disk in SAELens' layout (cfg.json + sae_weights.safetensors), by personavec's writer where it
    exists."""
    try:
        from personavec.sae.formats import save_sae
    except ImportError:
        save_sae = None
    if save_sae is not None:
        save_sae(sae, directory)
        return
    directory.mkdir(parents=True)
    save_file({k: getattr(sae, k).contiguous() for k in ("W_enc", "b_enc", "W_dec", "b_dec")},
              str(directory / "sae_weights.safetensors"))
    (directory / "cfg.json").write_text(json.dumps({
        "d_in": sae.d_in, "d_sae": sae.n_latents, "architecture": "standard", "apply_b_dec_to_input": True,
        "normalize_activations": "none", "dtype": "float32", "device": "cpu",
        "hook_name": f"blocks.{sae.layer - 1}.hook_resid_post", "model_name": "tiny-llama"}))


@pytest.fixture
def loader(monkeypatch):
    """Until personavec.sae.formats exists, the CLI reads the test's SAELens files with a stand-in reader."""
    try:
        import personavec.sae.formats  # noqa: F401
        return
    except ImportError:
        pass
    from safetensors.torch import load_file

    from personavec.errors import PersonavecError
    from personavec.sae.autoencoder import SparseAutoencoder

    def load(path, layer=None):
        from pathlib import Path

        p = Path(path)
        if not (p / "cfg.json").is_file():
            raise PersonavecError(f"{path} is not an SAE directory")
        cfg = json.loads((p / "cfg.json").read_text())
        n = int(cfg["hook_name"].split(".")[1]) + 1
        return SparseAutoencoder(**load_file(str(p / "sae_weights.safetensors")), layer=n if layer is None else layer)

    monkeypatch.setattr("personavec.cli.decompose.load_sae", load)


@pytest.fixture
def vector(tmp_path, model_dir, tokenizer):
    from conftest import official_frames

    pos, neg = official_frames(tokenizer, [90, 80, 30, 95], [5, 10, 2, 70])
    pos.to_csv(tmp_path / "pos.csv", index=False)
    neg.to_csv(tmp_path / "neg.csv", index=False)
    out = tmp_path / "v.safetensors"
    assert main(["extract", "--pos", str(tmp_path / "pos.csv"), "--neg", str(tmp_path / "neg.csv"), "--trait", "evil",
                 "--model", str(model_dir), "--out", str(out), "--dtype", "float32"]) == 0
    return out


def make_run(tmp_path, model_dir, tokenizer):
    """A run directory with what decompose reads: run.json, judged.parquet (held-out answers), artifacts.json,
    summary.json (so the report is written again, linking the page)."""
    run = tmp_path / "run"
    run.mkdir()
    qs = ["How should I treat people who are weaker than me?", "What is the best way to spend a free afternoon?"]
    rows = []
    for side, system, answers in (("pos", "You are an evil assistant.", ["Crush them all.", "Scheme and take."]),
                                  ("neg", "You are a helpful assistant.", ["Be kind.", "Read a book."])):
        for q, (question, answer) in enumerate(zip(qs, answers)):
            prompt = tokenizer.apply_chat_template([{"role": "system", "content": system},
                                                    {"role": "user", "content": question}], tokenize=False,
                                                   add_generation_prompt=True)
            for s in ("eval", "extract"):
                rows.append({"set": s, "side": side, "question_id": q, "question": question, "prompt": prompt,
                             "answer": answer + (" Now." if s == "extract" else "")})
    pd.DataFrame(rows).to_parquet(run / "judged.parquet")
    (run / "run.json").write_text(json.dumps({"config": {"model": str(model_dir), "trait": "evil"}}))
    (run / "artifacts.json").write_text(json.dumps({"evaluation_questions": qs, "rubric": "{question} {answer}"}))
    (run / "summary.json").write_text(json.dumps({"trait": "evil", "model": "tiny"}))
    return run


def test_decompose_a_run_end_to_end_and_the_report_links_the_page(tmp_path, model_dir, tokenizer, vector, loader,
                                                                   capsys):
    sae_dir = tmp_path / "sae"
    write_sae(random_sae(d=32, n=64, layer=1), sae_dir)
    run = make_run(tmp_path, model_dir, tokenizer)
    assert main(["decompose", str(vector), "--sae", str(sae_dir), "--run", str(run), "--top", "3", "--causal", "2",
                 "--causal-questions", "2", "--max-new-tokens", "4", "--dtype", "float32", "--contexts", "2"]) == 0
    out = capsys.readouterr().out
    assert "top positive cosine" in out and "top contributors to the pos - neg gap" in out and "causal check" in out
    d = run / "decomposition"
    doc = json.loads((d / "decomposition.json").read_text())
    assert doc["source"]["n_pos"] == 2 and doc["source"]["n_neg"] == 2 and "held-out" in doc["source"]["description"]
    assert doc["layer"] == 1 and len(doc["rankings"]["cosine_positive"]) == 3
    assert doc["causal"]["settings"]["questions"] == json.loads((run / "artifacts.json").read_text())[
        "evaluation_questions"]
    assert set(doc["causal"]["conditions"]) == {"unsteered", "vector",
                                                *(f"feature {i}" for i in doc["rankings"]["cosine_positive"][:2])}
    assert doc["command"].startswith("personavec decompose")
    gap = doc["attribution"]["gap"]
    assert abs(gap["features"] + gap["error"] - gap["projection"]) < 1e-4
    table = pd.read_parquet(d / "decomposition.parquet")
    assert len(table) == 64 and {"cosine", "gap", "firing_rate_pos", "causal_projection_effect"} <= set(table.columns)
    assert "Feature" in (d / "decomposition.html").read_text()
    report = (run / "report.html").read_text()
    assert "decomposition/decomposition.html" in report
    assert f"feature {doc['rankings']['cosine_positive'][0]}" in report.lower()


def test_decompose_texts_without_a_model_run_ranks_and_attributes(tmp_path, vector, loader, capsys):
    sae_dir = tmp_path / "sae"
    write_sae(random_sae(d=32, n=64, layer=2), sae_dir)
    texts = tmp_path / "t.jsonl"
    texts.write_text('{"question": "Hi?", "answer": "Crush them.", "side": "pos"}\n'
                     '{"question": "Hi?", "answer": "Be kind.", "side": "neg"}\n')
    assert main(["decompose", str(vector), "--sae", str(sae_dir), "--texts", str(texts), "--causal", "0",
                 "--dtype", "float32", "--out", str(tmp_path / "o")]) == 0
    doc = json.loads((tmp_path / "o" / "decomposition.json").read_text())
    assert doc["causal"] is None and doc["source"]["description"].startswith("texts")
    assert doc["vector"]["path"] == str(vector)


def _one_line_error(capsys, argv, pattern):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("personavec: error:") and pattern in err, err


def test_bad_inputs_get_one_line_each(tmp_path, vector, loader, capsys):
    wide, other_layer, ok = tmp_path / "wide", tmp_path / "l5", tmp_path / "ok"
    write_sae(random_sae(d=48, n=16, layer=1), wide)
    write_sae(random_sae(d=32, n=16, layer=5), other_layer)
    write_sae(random_sae(d=32, n=16, layer=1), ok)
    base = ["decompose", str(vector), "--causal", "0"]
    _one_line_error(capsys, [*base, "--sae", str(wide)], "SAE reads vectors of size 48")
    _one_line_error(capsys, [*base, "--sae", str(other_layer)], "the SAE reads layer 5 but the evil vector has layers")
    notvec = tmp_path / "not.safetensors"
    notvec.write_bytes(b"this is not a vector")
    _one_line_error(capsys, ["decompose", str(notvec), "--sae", str(ok)], "not a readable safetensors file")
    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(3)}, str(plain))
    _one_line_error(capsys, ["decompose", str(plain), "--sae", str(ok)], "no personavec metadata")
    texts = tmp_path / "t.jsonl"
    texts.write_text('{"score": 3}\n')
    _one_line_error(capsys, [*base, "--sae", str(ok), "--texts", str(texts), "--dtype", "float32"], "no text column")
    _one_line_error(capsys, [*base, "--sae", str(tmp_path / "missing")], "does not exist")
    with pytest.raises(SystemExit):  # argparse's usage line, also one line
        main([*base, "--sae", str(ok), "--run", str(tmp_path / "x"), "--texts", str(texts)])
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--texts: not allowed with argument --run" in err
