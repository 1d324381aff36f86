"""`trl-u2a` console script: `train`, `score`, `evaluate`, `demo` and `prepare-data` subcommands."""

from __future__ import annotations

import sys

from trl_u2a.scripts.errors import run_command

USAGE = """usage: trl-u2a [--debug] <command> [options]
       trl-u2a --version

commands:
  train   train with U2A (TrlParser arguments; --config recipe.yaml)
  score   score negatives by their influence on the alignment objective, no training (--config score.yaml)
  evaluate
          score a trained model or adapter: harmful rate under a judge, J and preference accuracy on pairs,
          retain perplexity
  demo    the offline end-to-end benchmark: U2A vs uniform unlearning on a built-in task (the [demo] extra)
  prepare-data
          build the paper's splits (alignment, original, forget, retain, train, test) from a preference dataset

Run `trl-u2a <command> --help` for the options of a command. A mistake in the input is reported in one line
(exit code 2); --debug (or TRL_U2A_DEBUG=1) shows its traceback too.
"""


def _command(name: str):
    """The `cli(argv)` function of subcommand `name`, or None for an unknown name (imported only when used)."""
    if name == "train":
        from trl_u2a.scripts.u2a import cli
    elif name == "score":
        from trl_u2a.scripts.score import cli
    elif name == "evaluate":
        from trl_u2a.scripts.evaluate import cli
    elif name == "demo":
        from trl_u2a.scripts.demo import cli
    elif name == "prepare-data":
        from trl_u2a.prepare_data import cli
    else:
        return None
    return cli


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--version":
        from trl_u2a import __version__

        print(f"trl-u2a {__version__}")
        return 0
    debug = bool(argv) and argv[0] == "--debug"
    argv = argv[debug:]
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    cli = _command(command)
    if cli is None:
        print(f"trl-u2a: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    return run_command(command, cli, rest, debug=debug)


if __name__ == "__main__":
    sys.exit(main())
