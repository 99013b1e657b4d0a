"""Bad input and faults, as a new user meets them: the real CLI in a subprocess, one line on stderr naming the
problem (no traceback), a non-zero exit, and nothing lost or half-written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from conftest import official_frames

pytestmark = pytest.mark.slow  # each case starts a Python process (about 4 s)

READ_ONLY = Path("/sys/personavec-test")  # writable by nobody, root included


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "personavec.cli", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}, timeout=600)


def fails(result: subprocess.CompletedProcess, *needles: str) -> str:
    err = result.stderr.strip()
    assert result.returncode == 2, (result.returncode, err[-2000:])
    assert "Traceback" not in err and len(err.splitlines()) == 1, err[-2000:]
    assert err.startswith("personavec: error:"), err
    for needle in needles:
        assert needle in err, err
    return err


def files_in(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


@pytest.fixture
def tables(tmp_path, tokenizer):
    pos, neg = official_frames(tokenizer, [90, 80, 30, 95], [5, 10, 2, 70])
    pos.to_csv(tmp_path / "pos.csv", index=False)
    neg.to_csv(tmp_path / "neg.csv", index=False)
    return tmp_path / "pos.csv", tmp_path / "neg.csv"


@pytest.fixture
def vector(tmp_path, model_dir, tables):
    out = tmp_path / "evil.safetensors"
    r = cli("extract", "--pos", tables[0], "--neg", tables[1], "--trait", "evil", "--model", model_dir, "--out", out)
    assert r.returncode == 0, r.stderr[-2000:]
    return out


def test_bad_tables_fail_before_the_model_loads(tmp_path, tables, tokenizer):
    pos, neg = tables
    no_answer = tmp_path / "no_answer.csv"
    pd.read_csv(pos).drop(columns=["answer"]).to_csv(no_answer, index=False)
    # the model does not even exist: the table's error must come first
    fails(cli("extract", "--pos", no_answer, "--neg", neg, "--model", tmp_path / "nowhere", "--out", tmp_path / "v"),
          "no 'answer' column")
    tokenizer.save_pretrained(tmp_path / "tokenizer-only")
    fails(cli("extract", "--pos", pos, "--neg", neg, "--model", tmp_path / "tokenizer-only", "--out",
              tmp_path / "v.safetensors"), "holds no model")
    assert not (tmp_path / "v.safetensors").exists()


def test_writes_into_a_read_only_place_are_one_line(tmp_path, model_dir, tables, vector):
    pos, neg = tables
    # extract fails before computing anything (no progress bar, no model-load line on stderr)
    fails(cli("extract", "--pos", pos, "--neg", neg, "--model", model_dir, "--out", READ_ONLY / "v.safetensors"),
          str(READ_ONLY))
    fails(cli("vectors", "export-gguf", vector, "--layers", "2", "--out", READ_ONLY / "v.gguf"), str(READ_ONLY))
    fails(cli("run", "--trait", "evil", "--model", model_dir, "--judge", "none", "--out", READ_ONLY),
          str(READ_ONLY))
    before = files_in(tmp_path)
    fails(cli("project", tables[0], "--vector", vector, "--layers", "1", "--model", model_dir, "--out",
              READ_ONLY / "p.jsonl"), str(READ_ONLY))
    assert files_in(tmp_path) == before


def test_non_finite_numbers_are_refused(tmp_path, model_dir, tables, vector):
    fails(cli("steer", "Hi", "--vector", vector, "--layer", "1", "--coef", "nan", "--model", model_dir),
          "--coef", "'nan' is not a finite number")
    fails(cli("run", "--trait", "evil", "--model", model_dir, "--steer-coefs=-1,inf", "--out", tmp_path / "runs"),
          "'inf' is not a finite number")
    assert not (tmp_path / "runs").exists()  # no run.json holding a bare NaN
    # vector files holding NaN / inf: refused on load and on import
    from safetensors.torch import load_file, save_file

    t = load_file(str(vector))
    t["response_avg"][1, 3] = float("nan")
    from safetensors import safe_open

    with safe_open(str(vector), framework="pt") as f:
        meta = f.metadata()
    save_file(t, str(tmp_path / "nan.safetensors"), metadata=meta)
    fails(cli("steer", "Hi", "--vector", tmp_path / "nan.safetensors", "--layer", "1", "--model", model_dir),
          "NaN or infinite", "layer(s) 1")
    torch.save(torch.full((3, 32), float("inf")), tmp_path / "evil_response_avg_diff.pt")
    fails(cli("vectors", "import-official", tmp_path / "evil_response_avg_diff.pt", "--out",
              tmp_path / "imp.safetensors"), "NaN or infinite")
    assert not (tmp_path / "imp.safetensors").exists()


def test_unreadable_scores_and_missing_answers_are_counted_not_swallowed(tmp_path, model_dir, tables):
    pos, neg = (pd.read_csv(p) for p in tables)  # pairs 0 and 1 pass the filter
    text_score = pos.assign(evil=pos["evil"].astype(object))
    text_score.loc[1, "evil"] = "high"  # text in a score column
    text_score.to_csv(tmp_path / "p.csv", index=False)
    r = cli("extract", "--pos", tmp_path / "p.csv", "--neg", tables[1], "--trait", "evil", "--model", model_dir,
            "--out", tmp_path / "v.safetensors")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "1 cells of column 'evil' are not numbers (e.g. 'high')" in r.stderr and "kept 1 of 4 pairs" in r.stdout
    no_answer = neg.copy()
    no_answer.loc[0, "answer"] = None  # an empty answer: it passed the filter as the string "nan"
    no_answer.to_json(tmp_path / "n.jsonl", orient="records", lines=True)
    r = cli("extract", "--pos", tables[0], "--neg", tmp_path / "n.jsonl", "--trait", "evil", "--model", model_dir,
            "--out", tmp_path / "v.safetensors")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "kept 1 of 4 pairs" in r.stdout


def test_long_answers_are_cut_to_the_models_context_and_counted(tmp_path, model_dir, tables):
    pos = pd.read_csv(tables[0])
    pos.loc[2, "answer"] = "Crush them all. " * 12_500  # 200 000 characters
    pos.to_csv(tmp_path / "long.csv", index=False)
    r = cli("extract", "--pos", tmp_path / "long.csv", "--neg", tables[1], "--no-filter", "--model", model_dir,
            "--out", tmp_path / "v.safetensors")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "1 of 4 rows are longer than 256 tokens" in r.stderr  # the tiny model's context
    # a cap shorter than the prompts leaves no answer to average: said, not averaged over nothing
    r = cli("extract", "--pos", tmp_path / "long.csv", "--neg", tables[1], "--no-filter", "--max-length", "40",
            "--model", model_dir, "--out", tmp_path / "v2.safetensors")
    assert r.returncode == 2 and "prompts alone fill the --max-length of 40 tokens" in r.stderr
    assert not (tmp_path / "v2.safetensors").exists()


def test_generator_endpoint_errors_name_the_generator(tmp_path, model_dir):
    fails(cli("run", "--trait", "sarcastic", "--description", "Mocks the user.", "--generator", "openai:gen",
              "--generator-base-url", "http://127.0.0.1:9/v1", "--model", model_dir, "--judge", "none",
              "--out", tmp_path / "runs", env={"OPENAI_API_KEY": "k"}),
          "generator endpoint http://127.0.0.1:9/v1 unreachable", "--generator-base-url")
    assert not (tmp_path / "runs").exists()


def test_vector_files_are_checked_against_the_models_config_and_gguf_is_accepted(tmp_path, model_dir, vector):
    from personavec.vectors.vector import PersonaVector

    foreign = PersonaVector(tensors={"response_avg": torch.randn(5, 16)}, model_id="other")
    foreign.save(tmp_path / "foreign.safetensors")
    # refused from the config alone: no model-load line precedes the error
    fails(cli("steer", "Hi", "--vector", tmp_path / "foreign.safetensors", "--layer", "1", "--model", model_dir),
          "extract a vector for this model")
    fails(cli("steer", "Hi", "--vector", vector, "--layer", "7", "--model", model_dir), "layer 7 out of range")
    assert cli("vectors", "export-gguf", vector, "--layers", "2", "--out", tmp_path / "v.gguf").returncode == 0
    r = cli("steer", "Hi", "--vector", tmp_path / "v.gguf", "--coef", "2", "--model", model_dir,
            "--max-new-tokens", "3")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "at layer 2" in r.stdout  # the control vector's one layer is its chosen layer
    assert oct(vector.stat().st_mode & 0o777) == oct(0o666 & ~_umask())  # not mkstemp's 0600


def test_a_projection_into_an_output_of_other_settings_or_with_bad_settings(tmp_path, model_dir, tables, vector):
    data = tmp_path / "conv.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi?"},
                                             {"role": "assistant", "content": "Go away."}]}) + "\n")
    out = tmp_path / "proj.jsonl"
    base = ["project", data, "--vector", vector, "--model", model_dir, "--out", out]
    assert cli(*base, "--layers", "1").returncode == 0
    before = out.read_bytes()
    fails(cli(*base, "--layers", "2"), "holds projections with other settings", "probes[0].layers was [1], now [2]")
    assert out.read_bytes() == before
    fails(cli(*base[:-1], tmp_path / "new.jsonl", "--layers", "1", "--poolings", "prompt_middle"), "unknown pooling")
    assert not (tmp_path / "new.jsonl").exists()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
