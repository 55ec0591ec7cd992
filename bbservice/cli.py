"""The ``bbservice`` command: one entry point, a subcommand per job.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and ``run(args)``;
this file only wires them up. Modules are imported when their command runs (``--help`` of the
top level stays fast and works without torch); a user error (:class:`BBServiceError`) ends the
program with a one-line message and exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from bbservice.errors import BBServiceError

# (command, kind or None) -> (module, one-line help)
COMMANDS: dict[tuple[str, str | None], tuple[str, str]] = {
    ("train", "music"): ("training.train_music", "train a piano-roll model"),
    ("train", "caption"): ("training.train_caption", "train an image-caption model"),
    ("eval", "music"): ("training.eval_music", "frame NLL of a music checkpoint"),
    ("eval", "caption"): ("training.eval_caption", "caption metrics of a caption checkpoint"),
    ("generate", "music"): ("training.generate_music", "generate MIDI from a music model"),
    ("generate", "scenes"): ("training.scenes_cli", "generate the captioned scene data set"),
    ("export", "music"): ("export.cli", "export a music checkpoint to ONNX"),
    ("export", "caption"): ("export.cli", "export a caption checkpoint to ONNX"),
    ("caption", None): ("training.caption_cli", "caption images with a checkpoint"),
    ("serve", None): ("bbservice.serve_cli", "serve the models over HTTP (BentoML)"),
    ("doctor", None): ("bbservice.doctor", "versions, devices and a smoke test of each path"),
    ("sweep", None): ("training.sweep", "train and evaluate data sets × families × seeds"),
    ("runs", "compare"): ("training.run_compare", "results table and curves of finished runs"),
}


def _load(module_name: str):
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name and module_name.startswith(err.name):
            return None  # the command is not part of this installation
        raise


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    """The full parser; only the modules of the command being run (or helped) are imported."""
    parser = argparse.ArgumentParser(prog="bbservice", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument(
        "--no-fused",
        action="store_true",
        help="run the gate math with eager torch ops instead of the fused kernels "
        "(same as BBSERVICE_FUSED=0)",
    )
    top = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    groups: dict[str, argparse._SubParsersAction] = {}
    wanted = next((a for a in argv if not a.startswith("-")), None)
    for (command, kind), (module_name, help_text) in COMMANDS.items():
        if kind is None:
            sub = top.add_parser(command, help=help_text, description=help_text)
        else:
            if command not in groups:
                group = top.add_parser(command, help=f"{command} music | caption | ...")
                groups[command] = group.add_subparsers(dest="kind", required=True, metavar="KIND")
            sub = groups[command].add_parser(kind, help=help_text, description=help_text)
        sub.set_defaults(module=module_name, kind=kind)
        if command == wanted:
            module = _load(module_name)
            if module is not None:
                add = getattr(module, f"add_{kind}_arguments", None) or module.add_arguments
                add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if getattr(args, "config", None):  # `--config FILE` made the file's values the defaults:
        args = parser.parse_args(argv)  # parse again so flags on the command line win
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if args.no_fused:  # before any import of bbservice.fused; reaches worker processes too
        os.environ["BBSERVICE_FUSED"] = "0"
        if "bbservice.fused" in sys.modules:
            sys.modules["bbservice.fused"].set_enabled(False)
    module = _load(args.module)
    if module is None:
        print(
            f"bbservice: '{args.command}' needs the training extra: pip install 'bbservice[train]'",
            file=sys.stderr,
        )
        return 2
    run = getattr(module, f"run_{args.kind}", None) if args.kind else None
    try:
        return int((run or module.run)(args) or 0)
    except BBServiceError as err:
        print(f"bbservice: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bbservice: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
