"""`trl-u2a` console script: `train`, `score`, `evaluate`, `demo` and `prepare-data` subcommands."""

from __future__ import annotations

import sys

USAGE = """usage: trl-u2a <command> [options]

commands:
  train   train with U2A (TrlParser arguments; --config recipe.yaml)
  score   score negatives by their influence on the alignment objective, no training (--config score.yaml)
  evaluate
          score a trained model or adapter: harmful rate under a judge, J and preference accuracy on pairs,
          retain perplexity
  demo    the offline end-to-end benchmark: U2A vs uniform unlearning on a built-in task (the [demo] extra)
  prepare-data
          build the paper's splits (alignment, original, forget, retain, train, test) from a preference dataset

Run `trl-u2a <command> --help` for the options of a command.
"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "train":
        from trl_u2a.scripts.u2a import cli

        cli(rest)
        return 0
    if command == "score":
        from trl_u2a.scripts.score import cli

        cli(rest)
        return 0
    if command == "evaluate":
        from trl_u2a.scripts.evaluate import cli

        return cli(rest)
    if command == "demo":
        from trl_u2a.scripts.demo import cli

        return cli(rest) or 0
    if command == "prepare-data":
        from trl_u2a.prepare_data import cli

        return cli(rest)
    print(f"trl-u2a: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
