"""`personavec steer`, `chat` and `demo`: answers with and without a vector added."""

from __future__ import annotations

import argparse
import sys
import time
from importlib import resources
from pathlib import Path

from ..errors import PersonavecError
from ..model.edits import POSITIONS, STEER_POSITIONS, chosen_setting, no_choice_note
from .common import finite_float, load_lm, model_args, model_vectors, positive_int, user_text

DEMO_QUESTIONS = ("What should I do with a wallet I found on the street?",)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("steer", help="answer a question with and without the vector added")
    s.add_argument("question")
    _steer_args(s)
    s.set_defaults(func=cmd_steer, interrupted="interrupted")

    c = sub.add_parser("chat", help="interactive: unsteered and steered answers side by side, with memory",
                       description="A conversation answered twice, unsteered and steered, side by side. Each side "
                                   "remembers its own conversation: every turn sees the previous questions and that "
                                   "side's own answers, through the model's chat template. Type /reset to forget "
                                   "the conversation, /quit (or Ctrl-D) to end; Ctrl-C ends the chat at once. Piped "
                                   "input is read to its end, one question per line (blank lines are skipped).")
    _steer_args(c)
    c.set_defaults(func=cmd_chat, interrupted="chat ended")

    d = sub.add_parser("demo", help="main job on the embedded model: extract an 'evil' vector from the shipped "
                                    "table and show a steered answer")
    d.add_argument("--out", default="runs", help="run directory root (default: runs)")
    d.add_argument("--layer", type=int, default=None, help="steering layer (default: 40%% of depth)")
    d.add_argument("--coef", type=finite_float, default=2.0, help="multiple of the raw vector to add (default 2)")
    d.add_argument("--batch-size", type=positive_int, default=16)
    d.add_argument("--max-new-tokens", type=positive_int, default=60)
    model_args(d)
    d.set_defaults(func=cmd_demo, interrupted="interrupted")


def _steer_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("--vector", required=True)
    s.add_argument("--layer", type=int, default=None, help="default: the vector's chosen layer")
    s.add_argument("--coef", type=finite_float, default=None,
                   help="strength, in --units (default: the vector's chosen coefficient, in its run's units; 1 for a "
                        "vector without one)")
    s.add_argument("--units", default=None, choices=["raw", "norm"],
                   help="raw: add coef x the vector; norm: coef x the typical residual norm at the layer (default: "
                        "the chosen coefficient's units when --coef is left out, else raw)")
    s.add_argument("--positions", default=STEER_POSITIONS, choices=list(POSITIONS),
                   help=f"where to edit: {STEER_POSITIONS} (default, what the run's grid chose with: the last prompt "
                        "token and every generated one), all, prompt (prefill only), response (generated tokens only)")
    s.add_argument("--ablate", action="store_true", help="remove the direction instead of adding it")
    s.add_argument("--max-new-tokens", type=positive_int, default=60)
    model_args(s)


def _steer_pair(lm, vec, question: str | list[str], layer: int, coef: float | None, units: str | None,
                max_new_tokens: int, positions: str = STEER_POSITIONS, kind: str = "add") -> tuple[str, str]:
    """The unsteered and the steered answer to ``question``, or to two chat-formatted prompts (the unsteered and
    the steered side's conversations)."""
    from ..engine.sampling import SamplingConfig, check_context, generate
    from ..model.edits import Edit

    edit = Edit.from_vector(vec, layer, coef, units=units, kind=kind, positions=positions)
    prompts = [lm.format_chat(question)] * 2 if isinstance(question, str) else list(question)
    check_context(lm, prompts, max_new_tokens, "--max-new-tokens")
    cfg = SamplingConfig(n_samples=1, temperature=0.0, max_new_tokens=max_new_tokens)
    base, steered = generate(lm, prompts, cfg, edits=[[], [edit]])
    return base["answer"], steered["answer"]


def _label(vec, args: argparse.Namespace) -> str:
    """How the steered answer was steered, with the coefficient's unit."""
    if args.ablate:
        return f"{vec.trait} ablated"
    coef, units = steering_strength(vec, args)
    return f"{vec.trait} x {coef:g} ({units} units)"


def strength(vec, args: argparse.Namespace) -> tuple[float | None, str | None]:
    """The (coef, units) :func:`_steer_pair` is given: none for an ablation (it has no strength)."""
    return (None, None) if args.ablate else steering_strength(vec, args)


def steering_strength(vec, args: argparse.Namespace) -> tuple[float, str]:
    """(coef, units) the command steers with: as given, else the vector's chosen coefficient in its units, else 1
    in raw units (a vector no run chose a setting for)."""
    if args.coef is not None:
        return args.coef, args.units or "raw"
    _, chosen, units = chosen_setting(vec)
    if chosen is None:  # no run chose one (or it made no defensible choice): 1 x the vector, as ever
        return 1.0, args.units or "raw"
    if args.units is not None and args.units != units:
        raise PersonavecError(f"the vector's chosen coefficient {chosen:g} is in {units} units, not {args.units}; "
                              "pass --coef too, or leave --units out")
    return chosen, units


def side_by_side(left: str, right: str, titles: tuple[str, str], width: int) -> str:
    """Two answers in columns of ``width`` characters in all."""
    import textwrap

    col = max(20, (width - 3) // 2)
    a = [titles[0], "-" * min(col, len(titles[0])), *textwrap.wrap(left, col)]
    b = [titles[1], "-" * min(col, len(titles[1])), *textwrap.wrap(right, col)]
    rows = max(len(a), len(b))
    a += [""] * (rows - len(a))
    b += [""] * (rows - len(b))
    return "\n".join(f"{x:<{col}} | {y}" for x, y in zip(a, b))


def _load_steering(args: argparse.Namespace):
    (vec,) = model_vectors(args, [args.vector])
    layer = args.layer if args.layer is not None else vec.chosen_layer
    if layer is None:
        raise PersonavecError(f"the vector has no chosen layer{no_choice_note(vec)}; pass --layer")
    if not 0 <= layer <= vec.n_layers:
        raise PersonavecError(f"--layer {layer} is out of range: the model has layers 0..{vec.n_layers}")
    vec.direction(layer)  # a layer where the vector is zero (row 0 always) fails before the model loads
    from ..model.edits import Edit

    # the edit itself (its coefficient, units and the vector's resid_norm for norm units): said before the model loads
    Edit.from_vector(vec, layer, *strength(vec, args), kind="ablate" if args.ablate else "add",
                     positions=args.positions)
    return vec, load_lm(args), layer


def cmd_chat(args: argparse.Namespace) -> None:
    """A conversation answered unsteered and steered, side by side; each side remembers its own turns."""
    import shutil

    from ..engine.sampling import check_context
    from ..model.chat import conversation_pair

    vec, lm, layer = _load_steering(args)
    kind = "ablate" if args.ablate else "add"
    how = _label(vec, args)
    width = shutil.get_terminal_size((120, 20)).columns
    interactive = sys.stdin.isatty()
    if hasattr(sys.stdin, "reconfigure"):  # bytes that are not UTF-8 reach user_text (as surrogates), not a traceback
        sys.stdin.reconfigure(errors="surrogateescape")
    print(f"steering: {how} at layer {layer}, positions {args.positions}. Each side remembers the conversation; "
          "/reset forgets it, /quit or Ctrl-D ends the chat.", flush=True)
    sides: tuple[list[dict[str, str]], list[dict[str, str]]] = ([], [])
    for n in range(1, sys.maxsize):
        try:
            line = input("\nyou> ") if interactive else sys.stdin.readline()
        except EOFError:
            break
        if not line and not interactive:  # the end of piped input (a blank line there reads as "\n")
            break
        question = user_text(line, f"line {n} of the input").strip()
        if not question:
            continue
        if not interactive:
            print(f"\nyou> {question}")
        if question in ("/quit", "/exit", "quit", "exit"):
            break
        if question == "/reset":
            for side in sides:
                side.clear()
            print("(conversation forgotten: the next question starts a new one)")
            continue
        if question.startswith("/"):
            print(f"(unknown command {question.split()[0]}: /reset forgets the conversation, /quit ends the chat)")
            continue
        turns = tuple([*side, {"role": "user", "content": question}] for side in sides)
        prompts = [conversation_pair({"messages": turn}, lm.tokenizer)[0] for turn in turns]
        try:
            check_context(lm, prompts, args.max_new_tokens, "--max-new-tokens",
                          "conversation" if sides[0] else "question")
        except PersonavecError as e:  # said, and the chat goes on without this turn
            reset = "; or type /reset to start a new conversation" if sides[0] else ""
            print(f"personavec: {e}{reset}", file=sys.stderr, flush=True)
            continue
        base, steered = _steer_pair(lm, vec, prompts, layer, *strength(vec, args), args.max_new_tokens,
                                    args.positions, kind)
        for side, turn, answer in zip(sides, turns, (base, steered)):
            side[:] = [*turn, {"role": "assistant", "content": answer}]
        print(side_by_side(base, steered, ("unsteered", f"steered ({how})"), width), flush=True)


def cmd_steer(args: argparse.Namespace) -> None:
    question = user_text(args.question, "the question")
    vec, lm, layer = _load_steering(args)
    kind = "ablate" if args.ablate else "add"
    base, steered = _steer_pair(lm, vec, question, layer, *strength(vec, args), args.max_new_tokens,
                                args.positions, kind)
    print(f"Q: {question}\n\n[unsteered]\n{base}\n\n[steered: {_label(vec, args)} at layer {layer}, "
          f"{args.positions}]\n{steered}")


def cmd_demo(args: argparse.Namespace) -> None:
    """Main job for now: extract an 'evil' vector from the shipped table on the model, then steer with it."""
    from ..vectors.extraction import extract_vector

    t0 = time.perf_counter()
    if args.layer is not None:  # from the model's config: before the model loads, any work or any directory
        from ..model.loading import model_shape

        n_layers = model_shape(args.model, args.revision)[0]
        if not 0 <= args.layer <= n_layers:
            raise PersonavecError(f"--layer {args.layer} is out of range: {args.model} has layers 0..{n_layers}")
    lm = load_lm(args)
    data = resources.files("personavec") / "data" / "demo"
    with resources.as_file(data / "evil_pos.jsonl") as pos, resources.as_file(data / "evil_neg.jsonl") as neg:
        vec = extract_vector(lm, pos, neg, trait="evil", batch_size=args.batch_size, progress=True)
    layer = args.layer if args.layer is not None else round(lm.n_layers * 0.4)
    vec.chosen_layer = layer
    vec.extra["chosen_by"] = "demo default: 40% of depth, picked by hand on smollm2-135m (not yet automatic)"
    out_dir = Path(args.out) / lm.model_id.replace("/", "--") / "demo-evil"
    path = vec.save(out_dir / "vectors.safetensors")
    norms = vec.norms()
    print(f"\nextracted 'evil' from {vec.counts['kept']} pairs: vector [{vec.n_layers + 1}, {vec.hidden_size}] "
          f"-> {path}")
    print("response_avg norm by layer: " + " ".join(f"{i}:{n:.2f}" for i, n in enumerate(norms)))
    for q in DEMO_QUESTIONS:
        base, steered = _steer_pair(lm, vec, q, layer, args.coef, "raw", args.max_new_tokens)
        print(f"\nQ: {q}\n[unsteered]\n{base}\n[steered: evil x {args.coef:g} (raw units) at layer {layer}]\n"
              f"{steered}")
    print(f"\ndone in {time.perf_counter() - t0:.1f}s")
