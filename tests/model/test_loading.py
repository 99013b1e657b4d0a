"""Loading models: hub revisions from the local Hugging Face cache, clear errors, shapes read before weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from personavec.errors import PersonavecError

REV_A, REV_B = "a" * 40, "b" * 40


@pytest.fixture
def hub_cache(tmp_path, tokenizer):
    """A Hugging Face cache holding two revisions of one hub id (main = A), with different weights."""
    from conftest import tiny_llama

    repo = tmp_path / "hub" / "models--acme--tiny-chat"
    for rev, seed in ((REV_A, 0), (REV_B, 1)):
        snap = repo / "snapshots" / rev
        tiny_llama(len(tokenizer), seed=seed).save_pretrained(snap)
        tokenizer.save_pretrained(snap)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(REV_A)
    return tmp_path / "hub"


LOAD = """
import json, sys
from personavec.model.loading import load_model
lm = load_model("acme/tiny-chat", revision=sys.argv[1] or None, dtype="float32")
w = lm.model.model.embed_tokens.weight
print(json.dumps({"revision": lm.revision, "w": float(w[5, 3])}))
"""


def test_a_hub_revision_is_the_one_loaded_and_recorded(hub_cache, tokenizer):
    """``revision`` was recorded in the vector's provenance but never passed to the loader."""
    from conftest import tiny_llama

    env = {**os.environ, "HF_HUB_CACHE": str(hub_cache), "HF_HUB_OFFLINE": "1"}
    got = {}
    for rev in ("", REV_B):
        out = subprocess.run([sys.executable, "-c", LOAD, rev], env=env, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr[-1500:]
        got[rev] = json.loads(out.stdout.strip().splitlines()[-1])
    want = {seed: float(tiny_llama(len(tokenizer), seed=seed).model.embed_tokens.weight[5, 3].detach())
            for seed in (0, 1)}
    assert got[""] == {"revision": REV_A, "w": pytest.approx(want[0])}
    assert got[REV_B] == {"revision": REV_B, "w": pytest.approx(want[1])}


def test_revision_of_a_local_model_is_refused(model_dir):
    from personavec.model.loading import load_model

    with pytest.raises(PersonavecError, match="revision"):
        load_model(str(model_dir), revision="main")


def test_a_directory_without_weights_is_one_clear_error(tmp_path, tokenizer):
    from personavec.model.loading import load_model

    tokenizer.save_pretrained(tmp_path / "tok-only")
    with pytest.raises(PersonavecError, match="holds no model"):
        load_model(str(tmp_path / "tok-only"))


def test_shape_is_read_from_the_config_without_loading_weights(model_dir, monkeypatch):
    from personavec.model import loading as models

    def no_weights(*a, **k):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(models, "_from_pretrained", no_weights)
    assert models.model_shape(str(model_dir)) == (2, 32, 256)  # layers, hidden size, context
    with pytest.raises(PersonavecError, match="holds no model"):
        models.model_shape(str(model_dir.parent))


@pytest.mark.parametrize("value", ["", "  "])
def test_an_empty_cache_variable_means_the_default_cache(value, tmp_path, monkeypatch):
    """``PERSONAVEC_CACHE=`` (set but empty) was the current directory: a 517 MB model was written there."""
    from personavec.model.loading import cache_root

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PERSONAVEC_CACHE", value)
    assert cache_root() == tmp_path / "home" / ".cache" / "personavec"
    monkeypatch.setenv("PERSONAVEC_CACHE", str(tmp_path / "elsewhere"))
    assert cache_root() == tmp_path / "elsewhere"


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return set(next((line for line in f if line.startswith("flags")), "").split())
    except OSError:
        return set()


def test_auto_dtype_is_the_rule_for_this_cpu_and_the_override_forces_it(monkeypatch):
    """`auto` is bfloat16 exactly where the CPU has native bfloat16 (or on CUDA); PERSONAVEC_DTYPE forces it."""
    import torch

    from personavec.model import loading

    monkeypatch.delenv(loading.DTYPE_ENV, raising=False)
    native = bool(_cpu_flags() & {"avx512_bf16", "amx_bf16"})
    assert loading.resolve_dtype("auto", "cpu") == (torch.bfloat16 if native else torch.float32)
    assert loading.resolve_dtype(None, "cuda") == torch.bfloat16
    for fast, want in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(loading, "cpu_has_fast_bf16", lambda fast=fast: fast)
        assert loading.resolve_dtype("auto", "cpu") == want
    for forced, want in (("float32", torch.float32), ("bf16", torch.bfloat16), (" ", None)):
        monkeypatch.setenv(loading.DTYPE_ENV, forced)
        if want is None:  # set but empty means unset
            assert loading.resolve_dtype("auto", "cpu") == torch.float32
            continue
        assert loading.resolve_dtype("auto", "cpu") == want and loading.resolve_dtype(None, "cuda") == want
        assert loading.resolve_dtype("float16", "cpu") == torch.float16  # a named dtype is never overridden
    monkeypatch.setenv(loading.DTYPE_ENV, "half-ish")
    with pytest.raises(PersonavecError, match="PERSONAVEC_DTYPE=half-ish is not a dtype"):
        loading.resolve_dtype("auto", "cpu")


@pytest.mark.parametrize("forced", ["float32", "bfloat16"])
def test_the_loader_and_the_run_config_honour_the_override(forced, model_dir, monkeypatch):
    import torch

    from personavec.model.loading import DTYPE_ENV, load_model
    from personavec.run.config import RunConfig

    monkeypatch.setenv(DTYPE_ENV, forced)
    assert load_model(str(model_dir), device="cpu").dtype == getattr(torch, forced)
    assert RunConfig(trait="evil", model=str(model_dir), device="cpu").resolved_dtype() == forced
