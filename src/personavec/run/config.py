"""A run's settings (:class:`RunConfig`), the names that become its directory, and the CPU profile."""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..engine.sampling import QUICK, SamplingConfig
from ..errors import PersonavecError, finite, shown, whole
from ..model.loading import DEFAULT_MODEL, default_device, resolve_dtype
from ..vectors.tables import FilterConfig


@dataclass
class RunConfig:
    trait: str
    description: str | None = None
    model: str = DEFAULT_MODEL
    judge: str = "local"  # local | local:MODEL | openai:MODEL | none
    # judge of the experiments' answers (monitor, finetune-experiment, screen-experiment); None: ``judge``.
    # Not part of the run's identity: changing it re-judges the stored answers, nothing is regenerated.
    eval_judge: str | None = None
    eval_judge_base_url: str | None = None  # for an openai: eval judge (default: judge_base_url)
    judge_base_url: str | None = None
    judge_concurrency: int = 8
    generator: str | None = None  # openai:MODEL | local:MODEL (only for traits that are not built in)
    generator_base_url: str | None = None
    artifacts_path: str | None = None
    eval_artifacts_path: str | None = None  # the official layout's evaluation file (with its extraction file)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    eval_samples: int = 2  # answers per side per evaluation question (held-out separation)
    filter: FilterConfig = field(default_factory=FilterConfig)
    filter_mode: str = "auto"  # auto | on | off (see Run.filter_decision)
    batch_size: int = 16  # extraction
    select: bool = True  # steered evaluation grid + automatic layer/coefficient choice
    quick: bool = False  # CPU-sized steering grid
    steer_layers: list[int] | None = None  # override the grid's layers
    steer_coefs: list[float] | None = None  # override the grid's coefficients (in steer_units)
    steer_units: str = "norm"  # the grid's coefficients: norm (x the residual norm at the layer) or raw (x the vector)
    coherence_min: float = 50.0  # selection: coherence kept by the chosen layer/coefficient
    mc_path: str | None = None  # MMLU-format multiple-choice data for the capability check (default: built in)
    device: str | None = None
    dtype: str | None = None
    revision: str | None = None  # a hub model's commit, branch or tag
    sampler: str = "local"  # local | openai:MODEL (the contrastive answers from a server serving the same weights)
    sampler_base_url: str | None = None
    sampler_concurrency: int = 16
    sampler_check: bool = True  # refuse a server whose greedy probe answer differs from the local model's

    def __post_init__(self) -> None:
        """Every field's type and range, named, before a run writes anything; ``sampling`` and ``filter`` may be
        dicts of their fields (converted), paths may be ``os.PathLike``."""
        check_name(self.trait, "trait")
        self.sampling = _settings(self.sampling, SamplingConfig, "sampling")
        self.filter = _settings(self.filter, FilterConfig, "filter")
        for name in ("description", "eval_judge", "eval_judge_base_url", "judge_base_url", "generator",
                     "generator_base_url", "artifacts_path", "eval_artifacts_path", "mc_path", "device", "dtype",
                     "revision", "sampler_base_url", "model", "judge", "sampler"):
            value = getattr(self, name)
            if isinstance(value, os.PathLike) and name.endswith("path"):
                value = os.fspath(value)
            optional = name not in ("model", "judge", "sampler")
            if not isinstance(value, str) and not (optional and value is None):
                raise PersonavecError(f"RunConfig {name} must be a string{' or None' if optional else ''}, not "
                                      f"{shown(value)}")
            setattr(self, name, value)
        for name in ("judge_concurrency", "eval_samples", "batch_size", "sampler_concurrency"):
            setattr(self, name, whole(getattr(self, name), f"RunConfig {name}", low=1))
        for name in ("select", "quick", "sampler_check"):
            if not isinstance(getattr(self, name), bool):
                raise PersonavecError(f"RunConfig {name} must be True or False, not {shown(getattr(self, name))}")
        if self.filter_mode not in ("auto", "on", "off"):
            raise PersonavecError(f"RunConfig filter_mode must be auto, on or off, not {shown(self.filter_mode)}")
        self.coherence_min = finite(self.coherence_min, "RunConfig coherence_min")
        if not 0 <= self.coherence_min <= 100:
            raise PersonavecError(f"RunConfig coherence_min must be between 0 and 100 (a judge score), not "
                                  f"{self.coherence_min:g}")
        for name, check in (("steer_layers", lambda x, what: whole(x, what, low=0)), ("steer_coefs", finite)):
            value = getattr(self, name)
            if value is None:
                continue
            if not isinstance(value, (list, tuple)) or not value:
                raise PersonavecError(f"RunConfig {name} must be a non-empty list or None, not {shown(value)}")
            setattr(self, name, [check(x, f"each of RunConfig {name}") for x in value])
        if self.steer_units not in ("raw", "norm"):
            raise PersonavecError(f"RunConfig steer_units must be raw or norm, not {shown(self.steer_units)}")
        if self.dtype is not None:
            resolve_dtype(self.dtype, "cpu")  # an unknown name, named now rather than when the model loads

    def resolved_device(self) -> str:
        return torch.device(self.device or default_device()).type

    def resolved_dtype(self) -> str:
        device = self.device or default_device()
        return str(resolve_dtype(self.dtype, device)).replace("torch.", "")

    def identity(self) -> dict[str, Any]:
        """The settings that define a run's outputs: all but concurrency and the experiments' judge, with the device
        type and dtype as resolved (a bfloat16 run resumed in float32 would mix answers and scores of both)."""
        d = asdict(self)
        for k in ("judge_concurrency", "eval_judge", "eval_judge_base_url", "sampler_base_url", "sampler_concurrency",
                  "sampler_check"):
            d.pop(k)
        d.update(device=self.resolved_device(), dtype=self.resolved_dtype())
        return d


def _settings(value: Any, kind: type, name: str) -> Any:
    """``value`` if it is a ``kind``; a dict of its fields converted to one (unknown keys named); else refused."""
    if isinstance(value, kind):
        return value
    if not isinstance(value, dict):
        raise PersonavecError(f"RunConfig {name} must be a {kind.__name__} (or a dict of its fields), not "
                              f"{shown(value)}")
    fields = {f.name for f in dataclasses.fields(kind) if f.init}
    unknown = [str(k) for k in value if k not in fields]
    if unknown:
        raise PersonavecError(f"RunConfig {name} has no field {', '.join(unknown)}; its fields are "
                              f"{', '.join(sorted(fields))}")
    return kind(**value)


NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,63}")
NAME_RULE = ("must be a word of ASCII letters (a-z, A-Z), digits, '-' and '_', starting with a letter, at most 64 "
             "characters (it names the run's directory)")


def check_name(name: str, what: str) -> str:
    """A trait (or other) name that is also a directory name: letters, digits, '-' and '_', starting with a letter."""
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise PersonavecError(f"{what} name {shown(name)} {NAME_RULE}")
    return name


def model_slug(spec: str, model_id: str | None = None) -> str:
    """One directory name for a model: path separators become '--', and no slug climbs out of its parent."""
    slug = re.sub(r"[^A-Za-z0-9._-]", "_", (model_id or spec).strip("/").replace("/", "--"))
    return slug if slug.strip(".") else f"model{slug}"


def quick_sampling(seed: int = 0) -> SamplingConfig:
    return SamplingConfig(**{**QUICK.to_dict(), "seed": seed})
