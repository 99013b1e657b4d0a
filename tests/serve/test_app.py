"""The app's answer bodies: valid JSON whatever the readings are."""

from __future__ import annotations

import json
import math

from personavec.engine.decoder import Request, Result
from personavec.serve.app import _persona_summary, _readings
from personavec.serve.policy import ChatCall


def test_readings_that_are_not_finite_are_null_in_the_answer():
    """An overflow in half precision gives inf or NaN residuals: the JSON (which has no NaN) says null."""
    call = ChatCall(Request("x", 3), [("evil", 1)], None, False, 1)
    result = Result(0, call.request, [5, 6, 7], "", "length", readings=[[1.5, math.nan, math.inf]])
    summary = _persona_summary(call, result)
    assert json.loads(json.dumps(summary, allow_nan=False)) == {
        "evil": {"layer": 1, "tokens": [1.5, None, None], "mean": 1.5, "max": 1.5, "guard_triggered": False}}
    assert _readings([-math.inf, 2.0]) == [None, 2.0]


def test_host_names_and_the_names_a_server_answers_to():
    from personavec.serve.app import allowed_hosts, host_name

    assert host_name("127.0.0.1:8000") == "127.0.0.1" and host_name("[::1]:80") == "[::1]"
    assert host_name("LocalHost") == "localhost" and host_name("[::1]") == "[::1]" and host_name("") == ""
    assert allowed_hosts("127.0.0.1", []) == ("127.0.0.1", "localhost", "[::1]")
    assert allowed_hosts("127.0.0.2", ["proxy.internal"]) == ("127.0.0.1", "localhost", "[::1]", "127.0.0.2",
                                                              "proxy.internal")
    assert allowed_hosts("::1", []) == ("127.0.0.1", "localhost", "[::1]")
    assert allowed_hosts("0.0.0.0", []) is None and allowed_hosts("192.168.1.5", []) is None
