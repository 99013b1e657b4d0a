"""`personavec serve`: the OpenAI-compatible chat server with per-request persona steering and readings."""

from __future__ import annotations

import argparse
import logging

from ..errors import PersonavecError
from .common import load_lm, model_args, model_vectors, positive_int

log = logging.getLogger(__name__)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("serve", help="OpenAI-compatible chat server that steers, caps and reads persona vectors",
                       description="Serves POST /v1/chat/completions (streaming or not), GET /v1/models and GET "
                                   "/v1/persona/vectors. A request's 'persona' object steers, caps and monitors "
                                   "with the loaded vectors (see docs/serve.md).")
    s.add_argument("--vector", action="append", default=[], metavar="NAME=PATH[@LAYER]",
                   help="a vector file under a name (repeat); the layer defaults to the vector's chosen layer")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY'")
    s.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                   help="bound to loopback, the server answers to Host 127.0.0.1, localhost and [::1] only (against "
                        "DNS rebinding); add a name, e.g. that a local reverse proxy forwards (repeatable)")
    s.add_argument("--model-name", default=None, help="the model's name in /v1/models (default: its id)")
    s.add_argument("--max-batch", type=positive_int, default=None, help="answers decoded together")
    s.add_argument("--cap", action="append", default=[], metavar="NAME[=MAX]",
                   help="default for every request without its own persona.cap: cap the projection on NAME's unit "
                        "direction (raw residual units) at MAX at its layer; MAX left out: the vector's calibrated "
                        "cap (repeatable)")
    s.add_argument("--guard", default=None, metavar="NAME[:THRESHOLD][:stop|steer[:COEF]]",
                   help="default for every request without its own persona.guard: when the answer's running mean "
                        "before-edit reading of NAME from its 16th token on (projection on its unit direction, raw "
                        "residual units) exceeds THRESHOLD, stop the answer (default) or steer by COEF (default -4) "
                        "for the rest; THRESHOLD left out: the vector's calibrated one")
    s.add_argument("--max-waiting", type=positive_int, default=256,
                   help="requests in flight before new ones get 503 (default 256)")
    model_args(s)
    s.set_defaults(func=cmd_serve)


def served_vectors(args: argparse.Namespace) -> dict:
    from ..serve.policy import parse_vector_spec, serve_vectors

    specs = [parse_vector_spec(s) for s in args.vector]
    return serve_vectors(specs, model_vectors(args, [p for _, p, _ in specs]))


def calibration_lines(vectors: dict) -> list[tuple[bool, str]]:
    """One line per served vector: its calibrated defaults (with units), or that it has none (flagged True)."""
    lines = []
    for name, sv in vectors.items():
        cal = sv.describe()["calibration"]
        if cal is None:
            lines.append((True, f"vector {name} has no calibration at layer {sv.layer}: a guard or cap on it needs an "
                                "explicit threshold (persona.guard.threshold, persona.cap[].max, --guard NAME:T, "
                                "--cap NAME=MAX); a run's separation stage or `personavec extract` records one"))
        else:  # a quantile is missing where no answer had enough tokens (the running mean's from its 16th)
            guard = "no default guard threshold (none of its eliciting answers is long enough for the rule: " \
                f"{cal['guard_rule']}; give persona.guard.threshold or --guard NAME:T)" \
                if cal["guard_threshold"] is None else \
                f"default guard threshold {cal['guard_threshold']:.4g} ({cal['guard_rule']})"
            cap = "no default cap (no eliciting answer token to take it from; give persona.cap[].max or --cap " \
                "NAME=MAX)" if cal["cap"] is None else f"default cap {cal['cap']:.4g} ({cal['cap_rule']})"
            lines.append((None in (cal["guard_threshold"], cal["cap"]),
                          f"vector {name} at layer {sv.layer}: {guard}, {cap}, in {cal['unit']}; from {cal['source']}"))
    return lines


def _check_address(host: str, port: int) -> None:
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        with socket.socket(infos[0][0], socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(infos[0][4])
    except OSError as e:
        raise PersonavecError(f"cannot listen on {host}:{port} ({e.strerror or e}); pick another --port or --host, or "
                              "stop the process that uses it") from None


def cmd_serve(args: argparse.Namespace) -> None:
    import uvicorn

    from ..serve.app import allowed_hosts, make_app

    if not 0 < args.port < 65536:
        raise PersonavecError(f"--port must be between 1 and 65535, not {args.port}")
    from ..serve.policy import BadRequest, parse_policy

    _check_address(args.host, args.port)  # before the model loads: a busy port is said in one line

    vectors = served_vectors(args)  # checked against the model's config before any weights are loaded
    try:
        policy = parse_policy(args.cap, args.guard, vectors)
    except BadRequest as e:
        raise PersonavecError(e.message) from None
    for missing, line in calibration_lines(vectors):
        (log.warning if missing else log.info)(line)
    lm = load_lm(args)
    # bound to loopback: answer to loopback names only (a rebound name of another site is refused)
    hosts = allowed_hosts(args.host, args.allow_host)
    app = make_app(lm, vectors, model_name=args.model_name, api_key=args.api_key, max_batch=args.max_batch,
                   max_waiting=args.max_waiting, policy=policy, hosts=hosts)
    log.info("serving %s with vectors %s on http://%s:%d/v1", lm.model_id, ", ".join(vectors) or "(none)",
             args.host, args.port)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
