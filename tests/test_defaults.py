"""One set of defaults: a vector's chosen setting means the same thing in the API, the CLI, the server and the grid."""

from __future__ import annotations

import pytest
import torch

from personavec.model.edits import STEER_POSITIONS, Edit
from personavec.vectors.vector import PersonaVector


@pytest.fixture
def chosen():
    """A vector whose run chose layer 1 at +0.1 in norm units (typical residual norm 50 there)."""
    torch.manual_seed(0)
    t = torch.randn(3, 32)
    return PersonaVector({"response_avg": t}, model_id="tiny-llama", trait="evil", chosen_layer=1,
                         extra={"resid_norm": [1.0, 50.0, 60.0],
                                "selection": {"chosen_layer": 1, "chosen_coef": 0.1,
                                              "grid": {"units": "norm", "positions": STEER_POSITIONS}}})


def test_the_api_cli_server_and_grid_steer_alike_by_default(chosen, lm):
    from personavec.cli import build_parser
    from personavec.cli.steer import steering_strength
    from personavec.run.config import RunConfig
    from personavec.serve.policy import ServedVector, parse_persona
    from personavec.steering.grid import default_grid

    want_coef = 0.1 * 50.0 / float(chosen.get(1).norm())  # 0.1 x the residual norm, along v-hat, in raw units
    api = Edit.from_vector(chosen)
    assert (api.layer, api.positions) == (1, STEER_POSITIONS) and api.coef == pytest.approx(want_coef)
    args = build_parser().parse_args(["steer", "--vector", "v.safetensors", "Hi?"])
    assert steering_strength(chosen, args) == (0.1, "norm") and args.positions == STEER_POSITIONS
    coef, units = steering_strength(chosen, args)
    cli = Edit.from_vector(chosen, args.layer, coef, units=units, positions=args.positions)  # what `steer` builds
    edits, _, _ = parse_persona({"steer": [{"vector": "evil"}]}, {"evil": ServedVector("evil", chosen, 1, "v")}, 2)
    for e in (cli, edits[0]):
        assert (e.layer, e.positions) == (api.layer, api.positions) and e.coef == pytest.approx(api.coef)
        assert torch.equal(e.direction, api.direction)
    grid = default_grid(30)
    assert (grid.positions, grid.units) == (STEER_POSITIONS, "norm") and RunConfig(trait="evil").steer_units == "norm"


def test_a_coefficient_given_without_units_is_raw_and_the_chosen_ones_units_cannot_be_swapped(chosen):
    from personavec.errors import PersonavecError

    assert Edit.from_vector(chosen, coef=2.0).coef == 2.0
    assert Edit.from_vector(chosen, coef=0.1, units="norm").coef == pytest.approx(Edit.from_vector(chosen).coef)
    with pytest.raises(PersonavecError, match=r"chosen coefficient 0\.1 is in norm units, not \"raw\""):
        Edit.from_vector(chosen, units="raw")
    bare = PersonaVector({"response_avg": torch.randn(3, 32)}, model_id="m", trait="evil", chosen_layer=1)
    assert Edit.from_vector(bare).coef == 1.0  # no chosen coefficient: 1 x the vector, as before


def test_a_vector_whose_run_made_no_defensible_choice_says_so_where_a_layer_is_asked_for(tmp_path, model_dir,
                                                                                        capsys):
    from personavec.cli import main
    from personavec.errors import PersonavecError

    vec = PersonaVector({"response_avg": torch.randn(3, 32)}, model_id="tiny-llama", trait="evil",
                        extra={"selection": {"chosen_layer": None, "chosen_coef": None, "defensible": False,
                                             "grid": {"units": "norm"}}})
    with pytest.raises(PersonavecError, match="no chosen layer \\(its run found no defensible steering setting"):
        Edit.from_vector(vec)
    path = vec.save(tmp_path / "v.safetensors")
    assert main(["steer", "--vector", str(path), "--model", str(model_dir), "Hi?"]) != 0
    err = capsys.readouterr().err
    assert "no chosen layer (its run found no defensible steering setting" in err and "--layer" in err


def test_a_chosen_coefficient_too_strong_for_the_server_is_refused_naming_it_not_null(chosen):
    from personavec.serve.policy import BadRequest, ServedVector, parse_persona

    chosen.extra["resid_norm"] = [1.0, 5000.0, 60.0]  # 0.1 norm is then far over the server's raw bound
    try:
        parse_persona({"steer": [{"vector": "evil"}]}, {"evil": ServedVector("evil", chosen, 1, "v")}, 2)
    except BadRequest as e:
        text = str(e) + " " + " ".join(map(str, e.args))
    else:
        raise AssertionError("not refused")
    assert "not the vector's chosen 0.1 norm (= " in text and "null" not in text


def test_norm_units_on_a_vector_without_resid_norm_are_refused_before_the_model_loads(tmp_path, model_dir, capsys,
                                                                                       monkeypatch):
    import personavec.cli.steer as steer_cli
    from personavec.cli import main

    monkeypatch.setattr(steer_cli, "load_lm", lambda args: (_ for _ in ()).throw(AssertionError("model loaded")))
    vec = PersonaVector({"response_avg": torch.randn(3, 32)}, model_id="tiny-llama", trait="evil")
    path = vec.save(tmp_path / "v.safetensors")
    assert main(["steer", "--vector", str(path), "--model", str(model_dir), "--layer", "1", "--coef", "0.1",
                 "--units", "norm", "Hi?"]) != 0
    assert "no resid_norm metadata" in capsys.readouterr().err
