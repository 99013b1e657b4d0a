"""The HTML pages' templates: each room's own (``<room>/templates/``) beside the ones they share
(``templates/common.html``: the look of text and tables, the key-value table)."""

from __future__ import annotations

from typing import Any


def template(room: str, name: str) -> Any:
    """The Jinja template ``name`` of ``personavec.<room>``, HTML-escaped, able to import ``common.html``."""
    from jinja2 import ChoiceLoader, Environment, PackageLoader, select_autoescape

    loader = ChoiceLoader([PackageLoader(f"personavec.{room}", "templates"), PackageLoader("personavec", "templates")])
    env = Environment(loader=loader, autoescape=select_autoescape(["html"]), keep_trailing_newline=True)
    return env.get_template(name)
