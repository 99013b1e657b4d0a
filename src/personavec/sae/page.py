"""The decomposition's page: a header with the vector, the SAE and the settings, then one card per feature.

``render_page(doc)`` turns the JSON document of :func:`~personavec.sae.decomposition.write_decomposition` into one
self-contained HTML file (inline CSS, no JavaScript, nothing fetched) from the Jinja2 template
``templates/decomposition.html`` with autoescaping on, as the run's report is made: every text from the corpus
(the contexts' tokens, the causal check's answers) is HTML-escaped. In a context each token is a ``<span>`` with its
activation in ``data-act`` (and a tooltip); tokens where the feature fires are shaded in proportion to the
activation, relative to the feature's highest one, and the top token of the context is outlined.
"""

from __future__ import annotations

import math
from typing import Any

from ..pages import template

SECTIONS = {"cosine_positive": "Top features by positive cosine with v̂",
            "cosine_negative": "Top features by negative cosine with v̂",
            "gap": "Top contributors to the pos − neg gap (not listed above)",
            "contribution": "Top contributors to the projection (not listed above)"}


def _fmt(x: Any, digits: int = 3, signed: bool = False) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    try:
        return f"{float(x):+.{digits}f}" if signed else f"{float(x):.{digits}f}"
    except (TypeError, ValueError):
        return str(x)


def _pct(x: Any) -> str:
    return "–" if x is None else f"{100 * float(x):.1f} %"


def _interval(r: dict[str, Any] | None, digits: int = 3) -> str:
    if not r or r.get("mean") is None:
        return "–"
    ci = f" [{_fmt(r.get('lo'), digits, True)}, {_fmt(r.get('hi'), digits, True)}]" if r.get("lo") is not None else ""
    return f"{_fmt(r['mean'], digits, True)}{ci} (n {r.get('n', '–')})"


def _tokens(ctx: dict[str, Any], top: float) -> list[dict[str, Any]]:
    out = []
    for j, (text, act) in enumerate(zip(ctx.get("tokens") or [], ctx.get("activations") or [])):
        alpha = max(0.0, min(1.0, act / top)) if top > 0 and act > 0 else 0.0
        out.append({"text": text, "act": f"{act:.4g}", "fires": act > 0, "centre": j == ctx.get("centre"),
                    "style": f"background:rgba(255,120,0,{alpha:.3f})" if act > 0 else ""})
    return out


def _card(card: dict[str, Any]) -> dict[str, Any]:
    top = max((c["activation"] for c in card.get("contexts") or []), default=0.0) or 0.0
    rows = [("decoder cosine with v̂", _fmt(card.get("cosine"), 4, True)),
            ("decoder row norm", _fmt(card.get("decoder_norm"), 3))]
    if "mean_act" in card:
        sides = f"{_fmt(card.get('mean_act_pos'), 4)} / {_fmt(card.get('mean_act_neg'), 4)}"
        rows += [("mean activation pos / neg" if "mean_act_pos" in card else "mean activation",
                  sides if "mean_act_pos" in card else _fmt(card.get("mean_act"), 4)),
                 ("firing rate (answer tokens) all" + (" · pos · neg" if "firing_rate_pos" in card else ""),
                  " · ".join(_pct(card.get(k)) for k in ("firing_rate", "firing_rate_pos", "firing_rate_neg")
                             if k in card))]
    if "gap" in card:
        rows += [("contribution to the projection pos / neg",
                  f"{_fmt(card.get('contribution_pos'), 4, True)} / {_fmt(card.get('contribution_neg'), 4, True)}"),
                 ("contribution to the pos − neg gap (share)",
                  f"{_fmt(card.get('gap'), 4, True)} ({_pct(card.get('gap_share'))})")]
    elif "contribution" in card:
        rows.append(("mean contribution to the projection", _fmt(card.get("contribution"), 4, True)))
    causal = card.get("causal")
    effects = []
    if causal:
        effects = [("projection on v̂", _interval(causal.get("projection_effect"))),
                   ("fluency (nats/token)", _interval(causal.get("fluency_effect"))),
                   ("trait (judge)", _interval(causal.get("trait_effect"), 1)),
                   ("degenerate answers", _pct(causal.get("degenerate_share")))]
    contexts = [{"side": c.get("side"), "activation": _fmt(c.get("activation"), 4), "row": c.get("row"),
                 "tokens": _tokens(c, top)} for c in card.get("contexts") or []]
    return {"latent": card["latent"], "ranks": ", ".join(card.get("ranks") or []), "rows": rows, "effects": effects,
            "contexts": contexts, "section": card.get("section")}


def _header(doc: dict[str, Any]) -> list[tuple[str, str]]:
    vec, sae, src = doc.get("vector") or {}, doc.get("sae") or {}, doc.get("source") or {}
    settings = doc.get("settings") or {}
    items = [("vector", f"{vec.get('trait')} ({vec.get('model_id')}), layer {doc.get('layer')}, norm "
                        f"{_fmt(vec.get('norm'), 3)}" + (f" — {vec['path']}" if vec.get("path") else "")),
             ("SAE", str(sae.get("describe"))),
             ("SAE file", str((sae.get("provenance") or {}).get("path", "in memory")))]
    if src:
        items.append(("answers", f"{src.get('description')}: {src.get('n_answers')} answers ({src.get('n_pos')} pos, "
                                 f"{src.get('n_neg')} neg), {src.get('n_tokens')} tokens"))
    items.append(("settings", ", ".join(f"{k} {v}" for k, v in settings.items() if k != "causal_config")))
    if doc.get("command"):
        items.append(("command", str(doc["command"])))
    return items


def _attribution(doc: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    att = doc.get("attribution") or {}
    rows = []
    for key, label in (("pos", "pos answers"), ("neg", "neg answers"), ("all", "all answers"),
                       ("gap", "gap pos − neg")):
        t = att.get(key)
        if t:
            rows.append((label, _fmt(t.get("projection"), 4, True), _fmt(t.get("features"), 4, True),
                         _fmt(t.get("bias"), 4, True), _fmt(t.get("error"), 4, True)))
    return rows


def _causal(doc: dict[str, Any]) -> dict[str, Any] | None:
    c = doc.get("causal")
    if not c:
        return None
    s = c.get("settings") or {}
    rows = []
    for name, r in (c.get("conditions") or {}).items():
        rows.append((name, _interval(r.get("projection")), _interval(r.get("projection_effect")),
                     _interval(r.get("fluency_effect")), _interval(r.get("trait_effect"), 1),
                     _pct(r.get("degenerate_share"))))
    answers: dict[str, list[tuple[str, str]]] = {}
    for a in c.get("answers") or []:
        answers.setdefault(str(a.get("condition")), []).append((str(a.get("question")), str(a.get("answer"))))
    return {"settings": f"coefficient {s.get('coef')} (norm units: the row added has length {s.get('coef')} × the "
                        f"typical residual norm {_fmt(s.get('resid_norm'), 3)} = {_fmt(s.get('raw_coef'), 3)}) at "
                        f"layer "
                        f"{s.get('layer')}, positions {s.get('positions')}, {len(s.get('questions') or [])} questions, "
                        f"{'greedy' if not s.get('temperature') else 'temperature ' + str(s.get('temperature'))}, "
                        f"{s.get('max_new_tokens')} new tokens; judge {s.get('judge') or 'none'}"
                        + ("" if s.get("judge_scored") or not s.get("judge") else " (gave no usable score)"),
            "rows": rows, "answers": answers}


def render_page(doc: dict[str, Any]) -> str:
    """The page's HTML for a decomposition document (the dict written as ``decomposition.json``)."""
    cards = [_card(c) for c in doc.get("cards") or []]
    sections = [(title, [c for c in cards if c["section"] == key]) for key, title in SECTIONS.items()]
    vec = doc.get("vector") or {}
    return template("sae", "decomposition.html").render(
        title=f"{vec.get('trait')} — SAE features at layer {doc.get('layer')}", header=_header(doc),
        attribution=_attribution(doc), causal=_causal(doc), sections=[s for s in sections if s[1]],
        notes=doc.get("notes") or [])
