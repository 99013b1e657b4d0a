"""The endpoint client's URL check (the SDK does the HTTP; personavec only refuses what cannot be an endpoint)."""

from __future__ import annotations

import pytest

from personavec.endpoint import split_url


@pytest.mark.parametrize("url, parts", [
    ("http://127.0.0.1:8000/v1", ("http", "127.0.0.1", 8000)),
    ("https://api.openai.com/v1", ("https", "api.openai.com", 443)),
    ("HTTP://Host.example/v1?x=1", ("http", "Host.example", 80)),
    ("http://[::1]:9000/v1", ("http", "::1", 9000)),
])
def test_http_urls_are_split(url, parts):
    assert split_url(url) == parts


@pytest.mark.parametrize("url", ["ftp://x", "http://", "localhost:8000", "not a url", "", None])
def test_what_is_not_an_http_url_is_refused(url):
    assert split_url(url) is None
