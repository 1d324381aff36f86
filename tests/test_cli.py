"""`trl-u2a train` for a person at a terminal: typos get "did you mean", resume takes True|last|PATH, Ctrl-C says how
to resume."""

import os
import shlex

import pytest

from trl_u2a import U2ATrainer
from trl_u2a.cli import main
from trl_u2a.scripts.u2a import UnknownOptionError, cli, make_parser

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "recipes", "tiny.yaml")


def test_a_misspelled_yaml_key_names_the_closest_valid_one(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("output_dir: out\nuse_cpu: true\nbf16: false\nreweight_step: 10\n")
    with pytest.raises(UnknownOptionError) as error:
        make_parser().parse_args_and_config(args=["--config", str(recipe)])
    assert f"{recipe}: unknown key 'reweight_step' (did you mean 'reweight_steps'?)." in str(error.value)


@pytest.mark.parametrize(
    "flag, expected",
    [
        (["--buget", "0.3"], "unknown option --buget (did you mean --budget?)"),
        (["--lerning_rate=1e-3"], "unknown option --lerning_rate (did you mean --learning_rate?)"),
        (["--zzzqqq", "1"], "unknown option --zzzqqq. Run"),
    ],
)
def test_a_misspelled_flag_is_one_line_with_the_closest_valid_one(capsys, flag, expected):
    # bf16 on a CPU machine would fail in TrainingArguments: the typo must be reported first
    assert main(["train", "--output_dir", "out", *flag]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("trl-u2a train: error: ") and expected in err
    assert "Traceback" not in err and "HfArgumentParser" not in err


def test_valid_flags_and_prefixes_are_not_reported():
    parser = make_parser()
    assert parser.unknown_names(["--budget", "0.3", "--no_in_training_scores", "--learning_r", "1", "--", "x"]) == []


SMALL = [
    "--config", TINY, "--max_steps", "4", "--reweight_steps", "2", "--pool_size", "8", "--pa_samples", "8",
    "--save_strategy", "steps", "--save_steps", "2", "--logging_steps", "1", "--disable_tqdm", "true",
]  # fmt: skip


@pytest.mark.slow
def test_ctrl_c_prints_the_last_checkpoint_and_the_resume_command_which_resumes(tmp_path, monkeypatch, capsys):
    resumed_from = []
    original_step, original_load = U2ATrainer.training_step, U2ATrainer._load_from_checkpoint

    def interrupted_step(self, *args, **kwargs):
        if self.state.global_step == 3:
            raise KeyboardInterrupt
        return original_step(self, *args, **kwargs)

    def load(self, checkpoint, *args, **kwargs):
        resumed_from.append(os.path.relpath(checkpoint, tmp_path))
        return original_load(self, checkpoint, *args, **kwargs)

    monkeypatch.setattr(U2ATrainer, "training_step", interrupted_step)
    monkeypatch.setattr(U2ATrainer, "_load_from_checkpoint", load)
    argv = [*SMALL, "--output_dir", str(tmp_path / "run")]
    with pytest.raises(SystemExit) as exit_:
        cli(argv)
    assert exit_.value.code == 130
    err = capsys.readouterr().err
    checkpoint = tmp_path / "run" / "checkpoint-2"
    assert f"trl-u2a train: interrupted. The last complete checkpoint is {checkpoint}. Resume from it with:" in err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    command = shlex.split(err.strip().splitlines()[-1])
    assert command[:2] == ["trl-u2a", "train"] and command[-2:] == ["--resume_from_checkpoint", str(checkpoint)]

    monkeypatch.setattr(U2ATrainer, "training_step", original_step)
    trainer = cli(command[2:])  # the printed command, as the user would paste it
    assert resumed_from == ["run/checkpoint-2"] and trainer.state.global_step == 4

    # True and last both take the last complete checkpoint of output_dir
    for word, steps in (("True", "6"), ("last", "8")):
        cli([*SMALL, "--output_dir", str(tmp_path / "run"), "--max_steps", steps, "--resume_from_checkpoint", word])
    assert resumed_from == ["run/checkpoint-2", "run/checkpoint-4", "run/checkpoint-6"]


def test_ctrl_c_before_any_checkpoint_says_so(tmp_path, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(U2ATrainer, "train", interrupted)
    with pytest.raises(SystemExit) as exit_:
        cli([*SMALL, "--output_dir", str(tmp_path / "run")])
    assert exit_.value.code == 130
    err = capsys.readouterr().err
    assert "\ntrl-u2a train: interrupted before any complete checkpoint was saved in" in err  # not on the bar's line


def test_resume_true_without_a_checkpoint_says_what_to_do(tmp_path):
    with pytest.raises(ValueError, match=r"holds no complete checkpoint .* Drop resume_from_checkpoint"):
        cli([*SMALL, "--output_dir", str(tmp_path / "none"), "--resume_from_checkpoint", "last"])


def test_a_jsonl_alignment_file_needs_no_alignment_split(tmp_path):
    import json

    from conftest import CHOSEN, PROMPTS, REJECTED

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n"
                             for p, c, r in zip(PROMPTS, CHOSEN, REJECTED)))  # fmt: skip
    argv = [*SMALL, "--output_dir", str(tmp_path / "run"), "--max_steps", "1", "--save_strategy", "no"]
    argv += ["--pa_samples", "4"]
    trainer = cli([*argv, "--alignment_dataset_name", str(pairs)])  # its only split is "train", not "alignment"
    assert len(trainer.alignment_dataset) == len(PROMPTS)


def test_help_shows_u2a_options_first_and_hides_the_inert_ones():
    """`trl-u2a train --help`: a one-line usage, U2A's own options first under their heading, KTO options that U2A
    never reads hidden (the help used to list U2A's options from line ~755 on, with no heading)."""
    text = make_parser(prog="trl-u2a train").format_help()
    lines = text.splitlines()
    assert lines[0] == "usage: trl-u2a train [--config RECIPE.yaml] [--OPTION VALUE ...]"
    heading = lines.index("U2A options:")
    assert heading < 5
    first_general = next(i for i, line in enumerate(lines) if line.lstrip().startswith("--output_dir"))
    for option in ("--loss_type", "--budget", "--reweight_warmup_steps", "--reweight_overhead", "--preconditioner"):
        position = next(i for i, line in enumerate(lines) if line.lstrip().startswith(option))
        assert heading < position < first_general, option
    for inert in ("--desirable_weight", "--sync_ref_model", "--train_sampling_strategy", "--precompute_ref_log_probs"):
        assert inert not in text
    assert "(default 0.1)" not in text  # --beta used to read "(default 0.1) ... (default: None)"
