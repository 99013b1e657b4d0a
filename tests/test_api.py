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
