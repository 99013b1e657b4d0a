"""The ``personavec`` command line: one module per command group (parser, handler and printer), on the library."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence

from ..errors import PersonavecError
from ..version import __version__
from . import decompose, extract, finetune, monitor, run, sae, screen, serve, steer, vectors
from .common import Parser


def build_parser() -> Parser:
    p = Parser(prog="personavec", description="Persona vectors for chat language models.")
    p.add_argument("--version", action="version", version=f"personavec {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in (extract, run, monitor, finetune, screen, vectors, steer, serve, sae, decompose):
        group.add_parsers(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("transformers", "accelerate", "httpx", "httpx2", "openai", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # weight-loading bars; personavec shows its own progress
    except ImportError:
        pass
    try:
        args.func(args)
    except PersonavecError as e:
        print(f"personavec: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the environment refused: a read-only place, a full disk, a missing device
        where = f" {e.filename}" if e.filename else ""
        print(f"personavec: error: cannot use{where}: {e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # commands that keep their work resume; the others (chat, steer) say they ended
        said = getattr(args, "interrupted", "interrupted (run the same command again to continue)")
        print(f"\npersonavec: {said}", file=sys.stderr)
        return 130
    return 0
