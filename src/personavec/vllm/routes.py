"""The plugin's HTTP routes on vLLM's API server (the ``vllm.endpoint_plugins`` entry point):

* ``GET /v1/persona/vectors``: the served vectors (name, trait, layer, norm, calibration, a digest of the
  vector) and the hooked layers, edit rounds and reads per layer;
* ``GET /v1/persona/reads/{key}``: the readings of the request sent with ``vllm_xargs.persona_key`` KEY — per
  reading, one value per generated token so far (a snapshot while the request runs, ``done`` once it ended);
  ``?pop=true`` forgets them.
"""

from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse

from .plugin import served_for


def _error(status: int, param: str | None, message: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": "invalid_request_error", "param": param,
                                   "code": status}}, status_code=status)


NO_CONFIG = ("this vLLM server has no personavec configuration: start it with --additional-config "
             "'{\"personavec\": {\"vectors\": [\"NAME=PATH@LAYER\"]}}'")


class Routes:
    name = "personavec"
    required_tasks = None

    def attach_router(self, app: FastAPI) -> None:
        router = APIRouter()

        @router.get("/v1/persona/vectors")
        async def vectors(request: Request) -> Any:
            served = getattr(request.app.state, "personavec_served", None)
            if served is None:
                return _error(404, None, NO_CONFIG)
            return {"object": "list", "plugin": "personavec", **served.describe()}

        @router.get("/v1/persona/reads/{key}")
        async def reads(key: str, request: Request, pop: bool = False) -> Any:
            client = getattr(request.app.state, "personavec_client", None)
            if client is None or getattr(request.app.state, "personavec_served", None) is None:
                return _error(404, None, NO_CONFIG)
            found = [r for r in await client.collective_rpc("personavec_reads", args=(key, pop)) if r is not None]
            if not found:
                return _error(404, "key", f"no readings under persona_key {key!r}: no request with that key asked "
                                          "for persona.monitor on this server, or they were fetched with pop")
            return {"key": key, **found[0]}

        app.include_router(router)

    async def init_state(self, engine_client: Any, state: Any, args: Any) -> None:
        state.personavec_client = engine_client
        state.personavec_served = None if engine_client is None else served_for(engine_client.vllm_config)
