"""RunConfig: every field checked at construction (nothing of a run is written on a refusal); dicts converted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from personavec.engine.sampling import SamplingConfig
from personavec.errors import PersonavecError
from personavec.run.config import RunConfig
from personavec.vectors.tables import FilterConfig


def test_sampling_and_filter_given_as_dicts_are_converted():
    cfg = RunConfig(trait="evil", sampling={"n_samples": 1}, filter={"pos_min": 60})
    assert cfg.sampling == SamplingConfig(n_samples=1)
    assert cfg.filter == FilterConfig(pos_min=60.0)
    json.dumps(cfg.identity())  # what run.json records


@pytest.mark.parametrize("kwargs, message", [
    ({"sampling": {"n_sample": 1}}, "RunConfig sampling has no field n_sample; its fields are batch_size, engine, "),
    ({"sampling": {"temperature": "1"}}, 'temperature must be a number, not "1"'),
    ({"sampling": 3}, "RunConfig sampling must be a SamplingConfig \\(or a dict of its fields\\), not 3"),
    ({"filter": {"pos_min": "high"}}, 'FilterConfig pos_min must be a number, not "high"'),
    ({"filter": {"neg_max": 150}}, "FilterConfig neg_max must be between 0 and 100 \\(a judge score\\), not 150"),
    ({"model": None}, "RunConfig model must be a string, not None"),
    ({"judge": 1}, "RunConfig judge must be a string, not 1"),
    ({"device": 0}, "RunConfig device must be a string or None, not 0"),
    ({"dtype": "fp8"}, "unknown dtype fp8"),
    ({"eval_samples": 0}, "RunConfig eval_samples must be at least 1, not 0"),
    ({"judge_concurrency": "8"}, 'RunConfig judge_concurrency must be a whole number \\(int\\), not "8"'),
    ({"batch_size": 2.5}, "RunConfig batch_size must be a whole number \\(int\\), not 2.5"),
    ({"select": "no"}, 'RunConfig select must be True or False, not "no"'),
    ({"filter_mode": "yes"}, 'RunConfig filter_mode must be auto, on or off, not "yes"'),
    ({"coherence_min": 101}, "RunConfig coherence_min must be between 0 and 100 \\(a judge score\\), not 101"),
    ({"steer_layers": 12}, "RunConfig steer_layers must be a non-empty list or None, not 12"),
    ({"steer_layers": [12, "14"]}, 'each of RunConfig steer_layers must be a whole number \\(int\\), not "14"'),
    ({"steer_coefs": [1.0, float("nan")]}, "each of RunConfig steer_coefs must be a finite number, not nan"),
])
def test_every_run_field_is_checked_before_anything_is_written(tmp_path, monkeypatch, kwargs, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PersonavecError, match=message):
        RunConfig(trait="evil", **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_paths_may_be_pathlike():
    cfg = RunConfig(trait="evil", mc_path=Path("mc.csv"), steer_layers=(3, 4), steer_coefs=[1, 2.5])
    assert (cfg.mc_path, cfg.steer_layers, cfg.steer_coefs) == ("mc.csv", [3, 4], [1.0, 2.5])
