"""PersonaVector files (safetensors, official .pt, llama.cpp GGUF), arithmetic, and compatibility checks."""

from __future__ import annotations

import pickle

import pytest
import torch

from personavec.errors import PersonavecError
from personavec.vectors.formats import (
    export_control_vector_gguf,
    from_control_vector_gguf,
    import_official,
    read_control_vector_gguf,
)
from personavec.vectors.vector import PersonaVector


def _vec(n_layers: int = 4, d: int = 8, seed: int = 0, **kw) -> PersonaVector:
    g = torch.Generator().manual_seed(seed)
    t = {p: torch.randn(n_layers + 1, d, generator=g) for p in ("response_avg", "prompt_avg", "prompt_last")}
    return PersonaVector(tensors=t, model_id="tiny", model_revision="r1", trait="evil", **kw)


def test_safetensors_round_trip_is_exact(tmp_path):
    v = _vec(chosen_layer=3, counts={"kept": 7}, filter={"pos_min": 50.0}, layers=[0, 1, 2, 3, 4],
             extra={"note": "x"})
    path = v.save(tmp_path / "v.safetensors")
    w = PersonaVector.load(path)
    for p in v.tensors:
        assert torch.equal(v.tensors[p], w.tensors[p])
    assert (w.model_id, w.model_revision, w.trait, w.chosen_layer) == ("tiny", "r1", "evil", 3)
    assert w.counts == {"kept": 7} and w.filter == {"pos_min": 50.0} and w.extra == {"note": "x"}
    assert w.layer_convention == v.layer_convention and w.personavec_version == v.personavec_version
    meta = v.metadata()
    assert meta["n_layers"] == 4 and meta["hidden_size"] == 8
    assert meta["norms"]["response_avg"] == pytest.approx(v.norms())
    assert not list(tmp_path.glob("*.tmp"))


def test_official_pt_import_is_exact_and_safe(tmp_path):
    t = torch.randn(5, 8)
    torch.save(t, tmp_path / "evil_response_avg_diff.pt")
    torch.save(t * 2, tmp_path / "evil_prompt_last_diff.pt")
    v = import_official([tmp_path / "evil_response_avg_diff.pt", tmp_path / "evil_prompt_last_diff.pt"])
    assert torch.equal(v.tensors["response_avg"], t) and torch.equal(v.tensors["prompt_last"], t * 2)
    assert v.trait == "evil" and v.extra["last_row"] == "hf_final_norm"

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with open(tmp_path / "bad_response_avg_diff.pt", "wb") as f:
        pickle.dump(Evil(), f)
    with pytest.raises(PersonavecError, match="refusing"):
        import_official(tmp_path / "bad_response_avg_diff.pt")
    torch.save(torch.randn(8), tmp_path / "flat.pt")
    with pytest.raises(PersonavecError, match="expected an"):
        import_official(tmp_path / "flat.pt")


def test_gguf_control_vector_round_trip(tmp_path):
    v = _vec(n_layers=6)
    path = export_control_vector_gguf(v, tmp_path / "cv.gguf", layers=[2, 4, 6], coef=1.5)
    rows, fields = read_control_vector_gguf(path)
    assert sorted(rows) == [2, 4, 6]
    for layer in (2, 4, 6):
        assert torch.equal(rows[layer], v.tensors["response_avg"][layer] * 1.5)
    assert fields["controlvector.model_hint"] == "tiny" and fields["controlvector.layer_count"] == 3
    # tensor names follow llama.cpp: personavec row ℓ is direction.(ℓ-1)
    import gguf

    names = sorted(t.name for t in gguf.GGUFReader(str(path)).tensors)
    assert names == ["direction.1", "direction.3", "direction.5"]
    back = from_control_vector_gguf(path, n_layers=6)
    assert torch.equal(back.tensors["response_avg"][4], v.tensors["response_avg"][4] * 1.5)
    assert torch.count_nonzero(back.tensors["response_avg"][3]) == 0
    with pytest.raises(PersonavecError, match="cannot go into"):
        export_control_vector_gguf(v, tmp_path / "x.gguf", layers=[1])


def test_arithmetic_and_cosine():
    a, b = _vec(seed=1), _vec(seed=2)
    s = a + b
    assert torch.allclose(s.tensors["prompt_avg"], a.tensors["prompt_avg"] + b.tensors["prompt_avg"])
    assert torch.allclose((a - a).tensors["response_avg"], torch.zeros(5, 8))
    assert torch.allclose((2 * a).tensors["response_avg"], a.tensors["response_avg"] * 2)
    assert torch.allclose((-a).tensors["response_avg"], -a.tensors["response_avg"])
    u = a.unit()
    assert torch.allclose(u.tensors["response_avg"].norm(dim=-1), torch.ones(5))
    assert torch.allclose(a.cosine(a), torch.ones(5), atol=1e-6)
    assert torch.allclose(a.cosine(-a), -torch.ones(5), atol=1e-6)
    with pytest.raises(PersonavecError, match="different models"):
        a + _vec(n_layers=3)


def test_mismatched_vector_is_refused(lm):
    good = _vec(n_layers=2, d=32)
    good.check_compatible(lm)
    with pytest.raises(PersonavecError, match="extract a vector for this model"):
        _vec(n_layers=3, d=32).check_compatible(lm)
    with pytest.raises(PersonavecError, match="32 dims"):
        _vec(n_layers=2, d=16).check_compatible(lm)


def test_bad_files_give_clear_errors(tmp_path):
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(PersonavecError, match="not a readable safetensors"):
        PersonaVector.load(tmp_path / "junk.safetensors")
    with pytest.raises(PersonavecError, match="does not exist"):
        PersonaVector.load(tmp_path / "missing.safetensors")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2, 2)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(PersonavecError, match="no personavec metadata"):
        PersonaVector.load(tmp_path / "foreign.safetensors")
    with pytest.raises(PersonavecError, match="no chosen layer"):
        _vec().get()


def test_a_failed_gguf_export_leaves_nothing_behind(tmp_path, monkeypatch):
    import gguf

    v = PersonaVector(tensors={"response_avg": torch.randn(4, 8)}, model_id="m", chosen_layer=2)

    def disk_full(self, *a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", disk_full)
    with pytest.raises(OSError):
        export_control_vector_gguf(v, tmp_path / "v.gguf")
    assert list(tmp_path.iterdir()) == []  # the fixed-name v.gguf.tmp used to stay


def test_the_last_row_of_an_imported_official_vector_warns(tmp_path, caplog):
    """The official format's row L is after the final norm; personavec's layer L is before it."""
    torch.save(torch.randn(4, 8), tmp_path / "evil_response_avg_diff.pt")
    v = import_official(tmp_path / "evil_response_avg_diff.pt")
    with caplog.at_level("WARNING"):
        v.get(2)
    assert not caplog.records
    with caplog.at_level("WARNING"):
        v.get(3)
        v.get(3)
    assert len(caplog.records) == 1 and "AFTER the model's final norm" in caplog.text


def test_a_zero_row_or_coef_zero_is_not_exported_as_a_control_vector_of_zeros(tmp_path, capsys):
    """A row that is zero (row 0, or a layer not extracted) exports a control vector that steers nothing: refused,
    naming the layer; so is --coef 0. Nothing is written."""
    from personavec.cli import main

    v = _vec(chosen_layer=3)
    v.tensors["response_avg"][3] = 0
    with pytest.raises(PersonavecError, match="the evil vector has no direction at layer 3 \\(its row there is zero\\)"
                                              "; it has one at layers 0-2, 4"):
        export_control_vector_gguf(v, tmp_path / "a.gguf")
    with pytest.raises(PersonavecError, match="no direction at layer 3"):
        export_control_vector_gguf(v, tmp_path / "a.gguf", layers=[2, 3])
    with pytest.raises(PersonavecError, match="coef 0 would write a control vector of zeros, which steers nothing; "
                                              "export with a non-zero coef"):
        export_control_vector_gguf(v, tmp_path / "a.gguf", layers=[2], coef=0)
    with pytest.raises(PersonavecError, match="coef must be a finite number, not nan"):
        export_control_vector_gguf(v, tmp_path / "a.gguf", layers=[2], coef=float("nan"))
    with pytest.raises(PersonavecError, match='layers must be a whole number \\(int\\), not "2"'):
        export_control_vector_gguf(v, tmp_path / "a.gguf", layers=["2"])
    assert list(tmp_path.iterdir()) == []
    v.save(tmp_path / "v.safetensors")
    assert main(["vectors", "export-gguf", str(tmp_path / "v.safetensors"), "--out", str(tmp_path / "b.gguf"),
                 "--layers", "2", "--coef", "0"]) != 0
    assert "--coef 0 would write a control vector of zeros" in capsys.readouterr().err
    assert not (tmp_path / "b.gguf").exists()
    export_control_vector_gguf(v, tmp_path / "c.gguf", layers=[2, 4], coef=2.0)  # rows with a direction still go


def test_direction_refuses_a_row_without_one_and_names_the_layers_with_one():
    v = _vec(n_layers=6)
    v.tensors["response_avg"][0] = 0
    v.tensors["response_avg"][4:] = 0
    assert torch.equal(v.direction(2), v.get(2))
    with pytest.raises(PersonavecError, match=r"the evil vector has no direction at layer 0 \(its row there is zero\)"
                                              r"; it has one at layers 1-3$"):
        v.direction(0)
    v.tensors["prompt_last"][:] = 0
    with pytest.raises(PersonavecError, match=r"no direction at layer 1 .*; it is zero at every layer"):
        v.direction(1, "prompt_last")
    v.tensors["prompt_avg"][2, 0] = float("nan")  # written after construction, which refuses NaN
    with pytest.raises(PersonavecError, match="no direction at layer 2 \\(its row there is not finite\\)"):
        v.direction(2, "prompt_avg")


def test_wrong_types_given_to_a_vector_are_one_clear_line():
    import numpy as np

    v = _vec()
    cases = [
        (lambda: PersonaVector(tensors=[torch.randn(5, 8)], model_id="m"),
         "PersonaVector tensors must be a non-empty dict of pooling -> \\[L\\+1, d\\] tensor, not a list"),
        (lambda: PersonaVector(tensors={"response_avg": [[1.0]]}, model_id="m"),
         'PersonaVector tensors must map pooling names \\(strings\\) to torch tensors, not "response_avg" to a list'),
        (lambda: v.get("2"), 'layer must be a whole number \\(int\\), not "2"'),
        (lambda: v.get(2.0), "layer must be a whole number \\(int\\), not 2.0"),
        (lambda: v + 1, "a PersonaVector \\+ 1: vectors add to and subtract from vectors only"),
        (lambda: v - v.get(1), "a PersonaVector - a torch tensor of shape \\[8\\]"),
        (lambda: v * "2", 'the factor a vector is multiplied by must be a number, not "2"'),
        (lambda: v * float("nan"), "must be a finite number, not nan"),
    ]
    for call, message in cases:
        with pytest.raises(PersonavecError, match=message):
            call()
    assert torch.equal(v.get(np.int64(2)), v.get(2))
    assert torch.equal((v * np.float32(2.0)).get(1), 2 * v.get(1))
