"""Helpers of the serve tests: a tiny model with two vectors on disk, and `personavec serve` started on it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from personavec import PersonaVector

KEY = "test-key"


def build(root: Path) -> Path:
    """``root/model`` (the tiny random Llama and its tokenizer) and ``root/{evil,kind}.safetensors``."""
    from conftest import make_tokenizer, tiny_llama

    tok = make_tokenizer()
    model = tiny_llama(len(tok))
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    g = torch.Generator().manual_seed(11)
    for name, layer in (("evil", 1), ("kind", 2)):
        PersonaVector({"response_avg": torch.randn(3, 32, generator=g) * 4}, model_id="tiny-llama", trait=name,
                      chosen_layer=layer).save(root / f"{name}.safetensors")
    return root


def start(root, args) -> tuple[subprocess.Popen, str]:
    """``personavec serve`` on the tiny model at a free loopback port, once it answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "personavec.cli", "serve", "--model", str(root / "model"), "--port", str(port),
           "--dtype", "float32", "--max-batch", "4", *args]
    env = {**os.environ, "PERSONAVEC_CACHE": str(root / "cache"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}/v1"
    t0 = time.time()
    while True:
        try:
            urllib.request.urlopen(urllib.request.Request(f"{url}/models", headers={"Authorization": f"Bearer {KEY}"}),
                                   timeout=2)
            return proc, url
        except urllib.error.HTTPError:
            return proc, url  # it answers (401 without the key)
        except (urllib.error.URLError, ConnectionError):
            if proc.poll() is not None or time.time() - t0 > 120:
                proc.kill()
                pytest.fail(f"the server did not start: {proc.stderr.read()[-2000:]}")
            time.sleep(0.2)


