"""The public API: what ``personavec`` exports, and docs/api.md run as written on the embedded model."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import personavec

DOCS = Path(__file__).resolve().parents[1] / "docs" / "api.md"


def test_the_public_names_resolve_and_are_documented():
    assert set(personavec.__all__) == set(personavec._API) | {"PersonavecError", "__version__"}
    text = DOCS.read_text()
    for name in personavec._API:
        assert callable(getattr(personavec, name)), name
    for name in ("load_model", "wrap_model", "extract_vector", "PersonaVector", "Edit", "steer", "project",
                 "LiveMonitor", "make_judge", "Run", "RunConfig", "finetune", "shift", "screen"):
        assert f"`{name}" in text, f"{name} is not documented in docs/api.md"


def test_import_is_light():
    """``import personavec`` loads neither torch nor transformers: a command that fails early stays quick."""
    code = "import sys, personavec; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


@pytest.mark.slow
def test_docs_api_runs_as_written(tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", DOCS.read_text(), flags=re.S)
    assert len(blocks) >= 9
    script = tmp_path / "api_examples.py"
    script.write_text("\n".join(blocks))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, env=env,
                         timeout=1500)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "steered:" in out.stdout and "projection per token:" in out.stdout
    assert (tmp_path / "runs" / "api-example" / "report.html").exists()
    assert (tmp_path / "ft" / "example" / "adapter" / "adapter_config.json").exists()
    assert (tmp_path / "screen-out" / "screen.parquet").exists()


def test_wrong_types_at_the_public_api_are_one_clear_line_not_a_raw_exception(lm, tmp_path):
    """Each of these raised a TypeError or AttributeError from deep inside (torch, pandas, a str method)."""
    import torch

    from conftest import tiny_llama

    pv = personavec
    vec = pv.PersonaVector(tensors={"response_avg": torch.randn(3, 32)}, model_id="tiny", trait="evil")
    cases = [
        (lambda: pv.load_model(None), "load_model's spec must be a string, not None"),
        (lambda: pv.load_model("smollm2-135m", device=0), "load_model's device must be a string, not 0"),
        (lambda: pv.load_model("smollm2-135m", dtype=32), "load_model's dtype must be a name such as float32"),
        (lambda: pv.wrap_model("gpt2", lm.tokenizer), 'wrap_model\'s model must be a loaded Hugging Face causal LM '
                                                      '\\(a torch module\\), not "gpt2"'),
        (lambda: pv.wrap_model(tiny_llama(len(lm.tokenizer)), None), "wrap_model's tokenizer must be the model's"),
        (lambda: pv.make_judge(None), "a judge spec is a string \\(local, local:MODEL, openai:MODEL or none\\), "
                                      "not None"),
        (lambda: pv.Run({"trait": "evil"}), 'Run takes a RunConfig, e.g. Run\\(RunConfig\\(trait="evil"\\)\\), not a '
                                            'dict'),
        (lambda: pv.load_vector(None), "load_vector takes the path of a vector file, not None"),
        (lambda: pv.load_vector(tmp_path / "v.gguf", n_layers="30"), "load_vector's n_layers must be a whole number"),
        (lambda: pv.shift(lm, lm, ["Why?"], [vec]), "shift's vectors must be a dict of name -> PersonaVector"),
        (lambda: pv.shift(lm, lm, "Why?", {"evil": vec}), 'shift\'s questions must be a non-empty list of strings, '
                                                          'not "Why\\?"'),
        (lambda: pv.shift(lm, lm, [], {"evil": vec}), "shift's questions must be .*, not an empty list"),
        (lambda: pv.shift(lm, lm, ["Why?", None], {"evil": vec}), "shift's questions must be .*, not None"),
        (lambda: pv.screen(lm, tmp_path / "d.jsonl", [vec], tmp_path / "out"), "vectors must be a dict of name"),
    ]
    for call, message in cases:
        with pytest.raises(pv.PersonavecError, match=message):
            call()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_screen_and_project_refuse_a_layer_where_the_vector_has_no_direction(lm, tmp_path):
    """Every probe (screen, project, the CLI's project and screen) is made by make_probes, which refuses a zero row:
    ΔP and projections on it were 0 for every row."""
    import json

    import torch

    t = torch.randn(3, 32)
    t[0] = 0
    vec = personavec.PersonaVector(tensors={"response_avg": t}, model_id="tiny-llama", trait="evil", chosen_layer=0)
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": lm.format_chat("Why?"), "answer": "Because."}) + "\n")
    with pytest.raises(personavec.PersonavecError, match="the evil vector has no direction at layer 0"):
        personavec.screen(lm, data, {"evil": vec}, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_extract_chat_project_and_shift_check_their_arguments_before_any_work(lm):
    from importlib import resources

    import torch

    pv = personavec
    demo = resources.files("personavec") / "data" / "demo"
    pos, neg = demo / "evil_pos.jsonl", demo / "evil_neg.jsonl"
    vec = pv.PersonaVector(tensors={"response_avg": torch.randn(3, 32)}, model_id="tiny", trait="evil",
                           chosen_layer=1)
    cases = [
        (lambda: pv.extract_vector(None, pos, neg), "extract_vector takes a model from load_model\\(...\\) or "
                                                    "wrap_model\\(model, tokenizer\\), not None"),
        (lambda: pv.extract_vector(lm, pos, neg, layers=["1"]), 'each of extract_vector\'s layers must be a whole '
                                                                'number \\(int\\), not "1"'),
        (lambda: pv.extract_vector(lm, pos, neg, batch_size="16"), "extract_vector's batch_size must be a whole"),
        (lambda: pv.extract_vector(lm, pos, neg, max_length="9"), "extract_vector's max_length must be a whole"),
        (lambda: pv.extract_vector(lm, pos, neg, min_pairs="2"), "extract_vector's min_pairs must be a whole"),
        (lambda: pv.extract_vector(lm, pos, neg, poolings="response_avg"), "extract_vector's poolings must be a list"),
        (lambda: pv.extract_vector(lm, pos, neg, trait=3), "extract_vector's trait must be a string"),
        (lambda: pv.extract_vector(lm, pos, neg, filter_config={"pos_min": 1}), "filter_config must be a FilterConfig"),
        (lambda: pv.chat(None, "Why?"), "chat takes a model from load_model"),
        (lambda: pv.project("smollm2-135m", [], {"evil": vec}), 'project takes a model .*, not "smollm2-135m"'),
        (lambda: pv.shift(lm, None, ["Why?"], {"evil": vec}), "shift's tuned takes a model"),
    ]
    for call, message in cases:
        with pytest.raises(pv.PersonavecError, match=message):
            call()
