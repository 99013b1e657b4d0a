"""The CLI end to end on a tiny saved model: outputs, and one-line errors (never a traceback)."""

from __future__ import annotations

import pytest
import torch

from personavec.cli import main
from personavec.cli.common import parse_layers
from personavec.errors import PersonavecError
from personavec.vectors.vector import PersonaVector


@pytest.fixture
def model_dir(tmp_path, lm):
    d = tmp_path / "tiny-model"
    lm.model.save_pretrained(d)
    lm.tokenizer.save_pretrained(d)
    return d


@pytest.fixture
def tables(tmp_path, tokenizer):
    from conftest import official_frames

    pos, neg = official_frames(tokenizer, [90, 80, 30, 95], [5, 10, 2, 70])
    pos.to_csv(tmp_path / "pos.csv", index=False)
    neg.to_json(tmp_path / "neg.jsonl", orient="records", lines=True)
    return tmp_path / "pos.csv", tmp_path / "neg.jsonl"


def _one_line_error(capsys, argv, pattern):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("personavec: error:")
    assert pattern in err, err
    return err


def test_extract_info_export_steer(tmp_path, model_dir, tables, capsys):
    pos, neg = tables
    out = tmp_path / "v.safetensors"
    assert main(["extract", "--pos", str(pos), "--neg", str(neg), "--trait", "evil", "--model", str(model_dir),
                 "--out", str(out), "--batch-size", "2"]) == 0
    assert "kept 2 of 4 pairs" in capsys.readouterr().out
    vec = PersonaVector.load(out)
    assert vec.n_layers == 2 and vec.hidden_size == 32 and vec.trait == "evil"
    assert vec.model_id == str(model_dir.resolve()) and vec.model_revision.startswith("local:")
    assert main(["vectors", "info", str(out)]) == 0
    assert "trait 'evil'" in capsys.readouterr().out
    assert main(["vectors", "export-gguf", str(out), "--out", str(tmp_path / "v.gguf"), "--layers", "2"]) == 0
    assert main(["vectors", "info", str(tmp_path / "v.gguf")]) == 0
    assert "direction.1" in capsys.readouterr().out
    assert main(["steer", "Hi?", "--vector", str(out), "--layer", "1", "--coef", "2", "--model", str(model_dir),
                 "--max-new-tokens", "3"]) == 0
    assert "[steered: evil x 2 (raw units) at layer 1, response_and_last_prompt]" in capsys.readouterr().out
    assert main(["steer", "Hi?", "--vector", str(out), "--layer", "2", "--ablate", "--positions", "response",
                 "--model", str(model_dir), "--max-new-tokens", "3"]) == 0
    assert "[steered: evil ablated at layer 2, response]" in capsys.readouterr().out


def test_cli_errors_are_one_line(tmp_path, model_dir, tables, capsys):
    pos, neg = tables
    out = str(tmp_path / "v.safetensors")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "answer": "a"}\n{oops\n')
    _one_line_error(capsys, ["extract", "--pos", str(bad), "--neg", str(neg), "--model", str(model_dir),
                             "--out", out], "malformed JSON")
    _one_line_error(capsys, ["extract", "--pos", str(pos), "--neg", str(neg), "--trait", "evil",
                             "--pos-min", "99", "--model", str(model_dir), "--out", out], "pos trait >= 99")
    _one_line_error(capsys, ["extract", "--pos", str(pos), "--neg", str(neg), "--model", "no-such-model-xyz",
                             "--out", out], "could not load model 'no-such-model-xyz'")
    _one_line_error(capsys, ["extract", "--pos", str(pos), "--neg", str(neg), "--model", str(model_dir),
                             "--layers", "7", "--out", out], "out of range")
    foreign = PersonaVector(tensors={"response_avg": torch.randn(5, 16)}, model_id="other")
    foreign.save(tmp_path / "foreign.safetensors")
    _one_line_error(capsys, ["steer", "Hi", "--vector", str(tmp_path / "foreign.safetensors"), "--layer", "1",
                             "--model", str(model_dir)], "extract a vector for this model")
    _one_line_error(capsys, ["vectors", "info", str(tmp_path / "missing.safetensors")], "does not exist")


def test_parse_layers():
    assert parse_layers(None) is None and parse_layers("all") is None
    assert parse_layers("1,4-6, 9") == [1, 4, 5, 6, 9]
    with pytest.raises(PersonavecError):
        parse_layers("a-b")


def test_help_on_every_command(capsys):
    for argv in (["--help"], ["extract", "--help"], ["vectors", "--help"], ["vectors", "info", "--help"],
                 ["vectors", "import-official", "--help"], ["vectors", "export-gguf", "--help"],
                 ["steer", "--help"], ["demo", "--help"], ["run", "--help"], ["report", "--help"], ["chat", "--help"],
                 ["monitor", "--help"],
                 ["project", "--help"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 0
        assert "usage:" in capsys.readouterr().out


def test_chat_shows_both_answers_side_by_side(tmp_path, model_dir, tables, capsys, monkeypatch):
    import io

    pos, neg = tables
    out = tmp_path / "v.safetensors"
    assert main(["extract", "--pos", str(pos), "--neg", str(neg), "--trait", "evil", "--model", str(model_dir),
                 "--out", str(out)]) == 0
    capsys.readouterr()
    monkeypatch.setattr("sys.stdin", io.StringIO("Hi?\nWhy?\n"))
    assert main(["chat", "--vector", str(out), "--layer", "1", "--coef", "0.5", "--units", "norm",
                 "--model", str(model_dir), "--max-new-tokens", "3"]) == 0
    text = capsys.readouterr().out
    assert text.count("unsteered") == 2 and text.count("steered (evil x 0.5 (norm units))") == 2
    assert all(" | " in line for line in text.splitlines() if line.startswith("unsteered"))


def test_norm_units_scale_to_the_typical_residual_norm(tmp_path, model_dir, tables, capsys):
    from personavec.model.edits import Edit

    pos, neg = tables
    out = tmp_path / "v.safetensors"
    assert main(["extract", "--pos", str(pos), "--neg", str(neg), "--trait", "evil", "--model", str(model_dir),
                 "--out", str(out)]) == 0
    vec = PersonaVector.load(out)
    norms = vec.extra["resid_norm"]
    assert len(norms) == 3 and all(n > 0 for n in norms)
    e = Edit.from_vector(vec, layer=2, coef=0.5, units="norm")
    assert abs(float((e.coef * e.direction).norm()) - 0.5 * norms[2]) < 1e-4
    assert Edit.from_vector(vec, layer=2, coef=0.5).coef == 0.5
    vec.extra.pop("resid_norm")
    with pytest.raises(PersonavecError, match="resid_norm"):
        Edit.from_vector(vec, layer=2, units="norm")


def test_project_command(tmp_path, model_dir, tables, capsys):
    import json

    pos, neg = tables
    vec_path = tmp_path / "v.safetensors"
    assert main(["extract", "--pos", str(pos), "--neg", str(neg), "--trait", "evil", "--model", str(model_dir),
                 "--out", str(vec_path)]) == 0
    data = tmp_path / "conv.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi?"},
                                             {"role": "assistant", "content": "Go away."}]}) + "\n")
    out = tmp_path / "proj.jsonl"
    assert main(["project", str(data), "--vector", str(vec_path), "--layers", "1,2", "--model", str(model_dir),
                 "--out", str(out)]) == 0
    row = json.loads(out.read_text())
    assert "messages" in row and {"evil@L1:prompt_last", "evil@L2:response_avg:cos"} <= set(row)
    capsys.readouterr()
    _one_line_error(capsys, ["project", str(data), "--vector", str(vec_path), "--model", str(model_dir),
                             "--out", str(out)], "no chosen layer")


def test_chat_remembers_each_sides_conversation_through_the_template_until_reset(tmp_path, model_dir, tables, capsys,
                                                                                  monkeypatch, tokenizer):
    import io

    import personavec.engine.sampling as sampling
    from personavec.model.chat import conversation_pair

    pos, neg = tables
    out = tmp_path / "v.safetensors"
    assert main(["extract", "--pos", str(pos), "--neg", str(neg), "--trait", "evil", "--model", str(model_dir),
                 "--out", str(out), "--dtype", "float32"]) == 0
    seen: list[tuple[list[str], list[dict]]] = []
    real = sampling.generate

    def spy(lm, prompts, cfg, **kw):
        answers = real(lm, prompts, cfg, **kw)
        seen.append((list(prompts), answers))
        return answers

    monkeypatch.setattr(sampling, "generate", spy)
    monkeypatch.setattr("sys.stdin", io.StringIO("Hi?\n\nWhy?\n/reset\nAnd?\n"))  # a blank line is not the end
    assert main(["chat", "--vector", str(out), "--layer", "1", "--coef", "4", "--model", str(model_dir),
                 "--dtype", "float32", "--max-new-tokens", "3"]) == 0
    assert "remembers the conversation; /reset forgets it" in capsys.readouterr().out
    assert len(seen) == 3
    (_, answers), (second, _), (third, _) = seen
    for side in (0, 1):  # each side's second prompt is its own first exchange, formatted by the template, then Why?
        history = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": answers[side]["answer"]},
                   {"role": "user", "content": "Why?"}]
        assert second[side] == conversation_pair({"messages": history}, tokenizer)[0]
    assert "Hi?" not in third[0] and "Hi?" not in third[1] and "And?" in third[0]  # /reset forgot it


def test_steer_and_chat_at_a_layer_where_the_vector_is_zero_fail_before_the_model_loads(tmp_path, model_dir, capsys,
                                                                                       monkeypatch):
    import personavec.cli.steer as steer_cli

    t = torch.randn(3, 32)
    t[0] = 0
    path = PersonaVector({"response_avg": t}, model_id="tiny-llama", trait="evil").save(tmp_path / "v.safetensors")
    monkeypatch.setattr(steer_cli, "load_lm", lambda args: pytest.fail("the model was loaded"))
    for command in (["steer", "Hi?"], ["chat"]):
        _one_line_error(capsys, [*command, "--vector", str(path), "--layer", "0", "--model", str(model_dir)],
                        "the evil vector has no direction at layer 0 (its row there is zero); it has one at layers 1-2")
