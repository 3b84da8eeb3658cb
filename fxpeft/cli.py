"""The ``fxpeft`` command line: ``fxpeft demo`` (more subcommands live beside it)."""

from __future__ import annotations

import argparse
import sys

__all__ = ["main"]


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(args.out, steps=args.steps, draw=not args.no_draw)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fxpeft", description="PEFT as compiler surgery on a torch.fx graph.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser("demo", help="trace a tiny Llama, rewrite, train, merge, export and draw",
                          description="The README's main job: trace → LoRA rewrite → train → merge → export → draw.")
    demo.add_argument("--out", default="fxpeft-demo", help="output directory (default: %(default)s)")
    demo.add_argument("--steps", type=int, default=30, help="training steps (default: %(default)s)")
    demo.add_argument("--no-draw", action="store_true", help="skip drawing the graph")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
