"""Train with U2A from the command line, the same way as TRL's scripts.

```bash
trl-u2a train --config recipes/tiny.yaml
accelerate launch -m trl_u2a.scripts.u2a --config recipes/tiny.yaml
python -m trl_u2a.scripts.u2a --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct \
    --dataset_name trl-lib/ultrafeedback_binarized --alignment_dataset_name my/pairs --output_dir out
```

Two reserved names make a run work offline with nothing downloaded: `--model_name_or_path trl-u2a/tiny` builds a tiny
Llama and tokenizer on the fly, and `--dataset_name trl-u2a/synthetic` uses the built-in synthetic assistant task
(`trl_u2a.synthetic`), whose `alignment` split is the alignment set.
"""

from __future__ import annotations

import argparse
import difflib
import os
import shlex
import sys
from dataclasses import dataclass, field

from trl import ScriptArguments, TrlParser

from trl_u2a._quiet import progress_bars_off
from trl_u2a.checks import check_model_source, check_output_dir, load_data_file, read_text_file
from trl_u2a.config import INERT_KTO_FIELDS
from trl_u2a.doc_links import docs_page
from trl_u2a.scripts.errors import U2AUserError, run_command

TINY_MODEL = "trl-u2a/tiny"
SYNTHETIC_DATASET = "trl-u2a/synthetic"


@dataclass
class U2AScriptArguments(ScriptArguments):
    """Script arguments: TRL's `ScriptArguments` plus where the alignment set comes from.

    Parameters:
        alignment_dataset_name (`str`, *optional*):
            Dataset id or local path of the alignment set (preference pairs). If unset, the split
            `alignment_split` of `dataset_name` is used when it exists; otherwise the run is plain weighted unlearning.
        alignment_dataset_config (`str`, *optional*):
            Configuration name of the alignment dataset.
        alignment_split (`str`, *optional*, defaults to `"alignment"`):
            Split of the alignment set: of `alignment_dataset_name` when given (a dataset with a single split, such as
            one .jsonl file, uses that split whatever its name), else of `dataset_name` (the `alignment` split that
            `trl-u2a prepare-data` writes).
        synthetic_seed (`int`, *optional*, defaults to `0`):
            Seed of the built-in synthetic task (`dataset_name=trl-u2a/synthetic`).
    """

    dataset_train_split: str = field(default="train", metadata={"help": "Dataset split to use for training."})
    alignment_dataset_name: str | None = field(
        default=None,
        metadata={"help": "Dataset id or local path of the alignment set (preference pairs)."},
    )
    alignment_dataset_config: str | None = field(
        default=None, metadata={"help": "Configuration name of the alignment dataset."}
    )
    alignment_split: str = field(
        default="alignment",
        metadata={
            "help": "Split of the alignment set, in --alignment_dataset_name when given (a single-split dataset such "
            "as one .jsonl file uses its only split), else in --dataset_name."
        },
    )
    synthetic_seed: int = field(default=0, metadata={"help": "Seed of the built-in synthetic task."})


def load_dataset_any(name: str, config: str | None = None, synthetic_seed: int = 0, flag: str = "--dataset_name"):
    """A `DatasetDict` from a hub id, a local data file (.json/.jsonl/.csv/.parquet), a `save_to_disk` directory, or
    the built-in synthetic task. A hub id that cannot be reached fails in seconds, in one line (`flag` names it)."""
    from datasets import DatasetDict, load_from_disk

    if name == SYNTHETIC_DATASET:
        from trl_u2a.synthetic import make_training_splits

        return make_training_splits(seed=synthetic_seed)
    if os.path.isdir(name) and (
        os.path.exists(os.path.join(name, "dataset_dict.json")) or os.path.exists(os.path.join(name, "state.json"))
    ):
        loaded = load_from_disk(name)
        return loaded if isinstance(loaded, DatasetDict) else DatasetDict({"train": loaded})
    extension = os.path.splitext(name)[1].lstrip(".").lower()
    if extension in ("json", "jsonl", "csv", "parquet"):
        if not os.path.isfile(name):
            raise FileNotFoundError(f"{flag} {name!r} looks like a local data file, but there is no such file.")
        return load_data_file(name, flag)
    if name.startswith((".", "/", "~")) and not os.path.exists(name):
        # A path, not a hub id: the hub's "not a local path and cannot be loaded from the Hub" would mislead
        raise FileNotFoundError(f"{flag} {name!r}: no such file or directory.")
    from trl_u2a.prepare_data import load_hub_dataset

    return load_hub_dataset(name, flag, name=config)


def load_alignment(script_args: U2AScriptArguments, dataset):
    """The alignment set: split `alignment_split` of `alignment_dataset_name` (its only split whatever its name, when
    it has one, such as a single .jsonl file), else of `dataset`, where it may be absent (None)."""
    if not script_args.alignment_dataset_name:
        return dataset.get(script_args.alignment_split)
    alignment = load_dataset_any(
        script_args.alignment_dataset_name, script_args.alignment_dataset_config, flag="--alignment_dataset_name"
    )
    if script_args.alignment_split not in alignment and len(alignment) == 1:
        # A single data file loads as one split named "train": that split is the alignment set
        return next(iter(alignment.values()))
    if script_args.alignment_split not in alignment:
        raise ValueError(
            f"--alignment_split={script_args.alignment_split!r} is not a split of "
            f"{script_args.alignment_dataset_name}; it has {sorted(alignment)}."
        )
    return alignment[script_args.alignment_split]


TINY_MODEL_NOTE = (
    f"{TINY_MODEL} is a randomly initialised model: it has learned nothing, so its influence scores reflect random "
    "weights and the alignment objective J (u2a/objective) may rise instead of fall. This run shows that the pipeline "
    "works; to see U2A lower J, run `trl-u2a demo` (a start model trained on the task) or give a trained model."
)
MODEL_REQUIRED = (
    "--model_name_or_path is required: the model to unlearn from, as a hub id (e.g. Qwen/Qwen2.5-0.5B-Instruct), a "
    f"local model directory, or {TINY_MODEL} (a tiny model built offline)."
)


def check_model_name(name_or_path: str | None) -> None:
    """A `U2AUserError` naming `--model_name_or_path` when it is missing; a local path that is no directory is
    refused by `checks.check_model_source`: `from_pretrained` would report either far from the cause."""
    if not name_or_path:
        raise U2AUserError(MODEL_REQUIRED)
    if name_or_path != TINY_MODEL:
        check_model_source(name_or_path, "--model_name_or_path")


def resolve_model(name_or_path: str | None, output_dir: str) -> str:
    """The reserved `trl-u2a/tiny` builds an offline tiny model into `output_dir/tiny-model`; anything else is a hub
    id or a local directory, loaded with `from_pretrained`. A missing name, or a path that is no directory, is a
    `U2AUserError` naming `--model_name_or_path`."""
    check_model_name(name_or_path)
    if name_or_path != TINY_MODEL:
        return name_or_path
    from accelerate import PartialState

    from trl_u2a.synthetic import default_corpus
    from trl_u2a.testing import save_tiny_model

    path = os.path.join(output_dir, "tiny-model")
    if PartialState().is_main_process:
        import logging

        logging.getLogger("trl_u2a").warning(TINY_MODEL_NOTE)
    with PartialState().main_process_first():
        if not os.path.exists(os.path.join(path, "config.json")):
            save_tiny_model(path, corpus=default_corpus(0), hidden_size=64, num_layers=2)
    return path


def _show_u2a_logs(training_args) -> None:
    """U2A's INFO lines (world size, distributed type and precision; the refresh plan; the reweighting cost) on the
    console of the main process; `--log_level` chooses another level. Python shows only warnings otherwise."""
    import logging

    from accelerate import PartialState

    logger = logging.getLogger("trl_u2a")
    if logger.handlers:  # configured by the caller
        return
    if training_args.log_level != "passive":
        level = training_args.get_process_log_level()
    else:
        level = logging.INFO if PartialState().is_main_process else logging.WARNING
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False


def main(script_args, training_args, model_args):
    from trl import get_peft_config, get_quantization_config

    from trl_u2a import U2ATrainer

    _show_u2a_logs(training_args)
    if training_args.disable_tqdm:
        progress_bars_off()  # the whole process is this run: loading, saving and map bars go too

    model_init_kwargs = dict(
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
        attn_implementation=model_args.attn_implementation,
        dtype=model_args.dtype,
    )
    if training_args.model_init_kwargs is not None:
        model_init_kwargs.update(training_args.model_init_kwargs)
    training_args.model_init_kwargs = {k: v for k, v in model_init_kwargs.items() if v is not None}

    # Before anything is loaded or written: a typo or an earlier run in the way should cost seconds
    check_output_dir(training_args.output_dir, training_args.resume_from_checkpoint, training_args.overwrite_output_dir)
    model = resolve_model(model_args.model_name_or_path, training_args.output_dir)
    if not script_args.dataset_name:
        raise ValueError("--dataset_name is required (a hub id, a local file or directory, or trl-u2a/synthetic).")
    dataset = load_dataset_any(script_args.dataset_name, script_args.dataset_config, script_args.synthetic_seed)
    if script_args.dataset_train_split not in dataset:
        raise ValueError(
            f"--dataset_train_split={script_args.dataset_train_split!r} is not a split of {script_args.dataset_name}; "
            f"it has {sorted(dataset)}."
        )
    alignment_dataset = load_alignment(script_args, dataset)
    eval_dataset = None
    if training_args.eval_strategy != "no":
        eval_dataset = dataset[script_args.dataset_test_split]

    trainer = U2ATrainer(
        model=model,
        args=training_args,
        train_dataset=dataset[script_args.dataset_train_split],
        alignment_dataset=alignment_dataset,
        eval_dataset=eval_dataset,
        quantization_config=get_quantization_config(model_args),
        peft_config=get_peft_config(model_args),
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.accelerator.print("Training completed.")
    trainer.save_model(training_args.output_dir)
    trainer.accelerator.print(f"Model saved to {training_args.output_dir}.")
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
    # Every rank finishes its last collective (and rank 0 its plots and files) before the process group goes away
    trainer.accelerator.wait_for_everyone()
    trainer.end()
    return trainer


class UnknownOptionError(U2AUserError):
    """A YAML key or command-line flag that no argument of `trl-u2a train` has (a typo, most often)."""


class U2AParser(TrlParser):
    """`TrlParser` whose unknown YAML keys and flags get one line naming them and the closest valid name, instead of
    `HfArgumentParser`'s message to developers ("... add them to the dataclass, or set fail_with_unknown_args=False").
    """

    def parse_args_and_config(self, args=None, return_remaining_strings=False, fail_with_unknown_args=True, **kwargs):
        args = list(sys.argv[1:] if args is None else args)
        if fail_with_unknown_args and not return_remaining_strings:
            # Before the parent parses: it builds the dataclasses first, whose own checks (e.g. bf16 on a CPU machine)
            # would then hide the typo behind an unrelated error
            problems = self.unknown_names(args)
            if problems:
                raise UnknownOptionError(f"{'; '.join(problems)}. Run `{self.prog} --help` for the options.")
            if not {"-h", "--help"} & set(args):
                check_model_name(self.model_name(args))
        return super().parse_args_and_config(args, return_remaining_strings, fail_with_unknown_args, **kwargs)

    @staticmethod
    def model_name(args: list[str]) -> str | None:
        """`model_name_or_path` as `args` set it, or else the YAML of `--config FILE` in them."""
        import yaml

        for i, arg in enumerate(args):
            flag, _, value = arg.partition("=")
            if flag == "--model_name_or_path":
                return value if value else (args[i + 1] if i + 1 < len(args) else None)
        if "--config" in args[:-1]:
            with open(args[args.index("--config") + 1]) as f:
                config = yaml.safe_load(f)
            if isinstance(config, dict):
                return config.get("model_name_or_path")
        return None

    def unknown_names(self, args: list[str]) -> list[str]:
        """One phrase per YAML key of `--config FILE` and per `--flag` of `args` that no argument has."""
        import yaml

        flags = {s[2:] for s in self._option_string_actions if s.startswith("--")}
        problems = []
        if "--config" in args[:-1]:
            path = args[args.index("--config") + 1]
            config = yaml.safe_load(read_text_file(path, "--config"))
            if isinstance(config, dict):  # anything else gets TrlParser's own error
                dests = {a.dest for a in self._actions if a.option_strings} | {"env"}
                unknown = [str(key) for key in config if key not in dests]
                problems += [f"{path}: unknown key " + _hint(key, dests, "'{}'") for key in unknown]
        for arg in args:
            name = arg[2:].split("=", 1)[0]
            # argparse accepts an unambiguous prefix of a long option too
            known = name in flags or sum(f.startswith(name) for f in flags) == 1
            if arg.startswith("--") and name not in ("", "config") and not known:
                problems.append(f"unknown option {_hint(name, flags, '--{}')}")
        return problems


def _hint(name: str, valid: set[str], show: str) -> str:
    """`show`-formatted `name`, with the closest valid name: "--buget (did you mean --budget?)"."""
    close = difflib.get_close_matches(name, sorted(valid - {"help"}), n=1, cutoff=0.6)
    return show.format(name) + (f" (did you mean {show.format(close[0])}?)" if close else "")


def make_parser(subparsers: argparse._SubParsersAction | None = None, prog: str | None = None):
    from trl import ModelConfig

    from trl_u2a import U2AConfig

    dataclass_types = (U2AScriptArguments, U2AConfig, ModelConfig)
    if subparsers is not None:
        parser = subparsers.add_parser("train", help="Train with U2A", dataclass_types=dataclass_types)
    else:
        parser = U2AParser(dataclass_types, prog=prog)
    _arrange_help(parser, U2AConfig)
    return parser


def _arrange_help(parser: argparse.ArgumentParser, config_class) -> None:
    """`--help` lists U2A's own options first, under their own heading, and hides the inherited ones it ignores
    (otherwise U2A's options start some 750 lines down, after every `TrainingArguments` option)."""
    import inspect

    own = set(inspect.get_annotations(config_class))
    group = parser.add_argument_group(
        "U2A options",
        f"The unlearning loss and the bi-level reweighting ({docs_page('usage', 'choosing-the-knobs')}).",
    )
    for action in parser._actions:
        if action.dest in INERT_KTO_FIELDS:
            action.help = argparse.SUPPRESS
        elif action.dest in own and action.dest not in ("learning_rate",):
            for other in parser._action_groups:
                if other is not group and action in other._group_actions:
                    other._group_actions.remove(action)
            group._group_actions.append(action)
    parser._action_groups.remove(group)
    parser._action_groups.insert(0, group)
    # argparse's usage would list every one of some 300 options before any help text
    parser.usage = "%(prog)s [--config RECIPE.yaml] [--OPTION VALUE ...]"


def without_option(argv: list[str], option: str) -> list[str]:
    """`argv` less `option` and its value, in both the `--option value` and `--option=value` forms."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == option:
            skip = True
        elif not arg.startswith(f"{option}="):
            kept.append(arg)
    return kept


def interrupt_message(output_dir: str, argv: list[str], world_size: int = 1) -> str:
    """What to tell a user who pressed Ctrl-C: the last complete checkpoint and the command that resumes from it."""
    from trl_u2a.safe_state import last_complete_checkpoint

    checkpoint = last_complete_checkpoint(output_dir)
    if checkpoint is None:
        return (
            f"trl-u2a train: interrupted before any complete checkpoint was saved in {output_dir}; rerunning the same "
            "command starts from scratch (set --save_strategy steps --save_steps N to be able to resume)."
        )
    # The same arguments with the resume flag replaced
    kept = without_option(argv, "--resume_from_checkpoint")
    launcher = "trl-u2a train"
    if world_size > 1:
        launcher = "accelerate launch <the same launch options> -m trl_u2a.scripts.u2a"
    command = " ".join([launcher, *map(shlex.quote, kept), "--resume_from_checkpoint", shlex.quote(checkpoint)])
    return (
        f"trl-u2a train: interrupted. The last complete checkpoint is {checkpoint}. Resume from it with:\n  {command}"
    )


def cli(argv: list[str] | None = None):
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = make_parser(prog="trl-u2a train")
    # A user error is raised: `trl-u2a` (and `python -m`) print it in one line (`scripts.errors`)
    script_args, training_args, model_args = parser.parse_args_and_config(args=argv)
    try:
        return main(script_args, training_args, model_args)
    except KeyboardInterrupt:
        # Every rank gets the Ctrl-C; one message is enough
        if os.environ.get("RANK", "0") == "0":
            world_size = int(os.environ.get("WORLD_SIZE", "1"))
            # On a line of its own: the progress bar's line has no newline yet
            print("\n" + interrupt_message(training_args.output_dir, argv, world_size), file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    sys.exit(run_command("train", cli, sys.argv[1:]))
