"""The `trl-u2a` console's failures: a user error is one line `trl-u2a <command>: error: ...` with exit code 2 in
every subcommand, a bug keeps its traceback, `--debug` shows the traceback of a user error too."""

import json

import pytest
import torch
from conftest import CHOSEN, PROMPTS, REJECTED

from trl_u2a.cli import main
from trl_u2a.scripts.errors import U2AUserError, is_user_error, run_command
from trl_u2a.scripts.score import make_parser as score_parser
from trl_u2a.scripts.u2a import check_model_name


def one_error_line(capsys, command: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if not line.startswith("Skipping publisher trust check")]
    assert len(lines) == 1 and lines[0].startswith(f"trl-u2a {command}: error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize(
    "argv, expected",
    [
        # bare `train` used to fail on bf16 in TrainingArguments, before the missing model was noticed
        (["train"], "--model_name_or_path is required"),
        (["train", "--dataset_name", "trl-u2a/synthetic", "--output_dir", "out"], "--model_name_or_path is required"),
        (
            ["train", "--model_name_or_path", "./nope", "--dataset_name", "x"],
            "--model_name_or_path './nope': no such directory",
        ),
        (["score", "--dataset_name", "trl-u2a/synthetic"], "--model_name_or_path is required"),
        (["score", "--model_name_or_path=./nope"], "--model_name_or_path './nope': no such directory"),
        (["evaluate", "--model_name_or_path", "./nope", "--pairs", "missing.jsonl"], "no such file"),
        (["prepare-data", "--dataset", "missing.jsonl", "--output_dir", "out"], "missing.jsonl"),
    ],
)
def test_user_errors_are_one_line_with_exit_code_2_in_every_subcommand(capsys, tmp_path, monkeypatch, argv, expected):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    assert expected in one_error_line(capsys, argv[0])


def test_model_argument_checks_name_the_option(tmp_path, monkeypatch):
    with pytest.raises(U2AUserError, match="--model_name_or_path is required"):
        check_model_name(None)
    file = tmp_path / "model.bin"
    file.write_text("")
    with pytest.raises(NotADirectoryError, match="is a file; expected a model folder"):
        check_model_name(str(file))
    with pytest.raises(FileNotFoundError, match="'a/b/c': no such directory"):
        check_model_name("a/b/c")
    for valid in ("Qwen/Qwen2.5-0.5B-Instruct", "trl-u2a/tiny", str(tmp_path)):
        check_model_name(valid)
    # A typo under a local folder is a path, not the hub id of an organisation named like the folder
    (tmp_path / "runs").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="'runs/tny': no such directory"):
        check_model_name("runs/tny")


def test_a_bug_keeps_its_traceback_and_debug_shows_a_user_errors():
    def bug(argv):
        raise KeyError("negative_id")

    def torch_value_error(argv):  # a ValueError raised inside torch: a shape U2A got wrong, not the user's input
        torch.nn.functional.cross_entropy(torch.zeros(2, 3), torch.zeros(3, dtype=torch.long))

    def user_error(argv):
        raise ValueError("budget=0 must be positive")

    with pytest.raises(KeyError):
        run_command("train", bug, [])
    with pytest.raises(ValueError, match="batch_size"):
        run_command("train", torch_value_error, [])
    assert run_command("train", user_error, []) == 2
    with pytest.raises(ValueError, match="budget=0"):
        run_command("train", user_error, [], debug=True)
    with pytest.raises(U2AUserError):
        main(["--debug", "score"])


def test_debug_environment_variable_shows_the_traceback(monkeypatch):
    monkeypatch.setenv("TRL_U2A_DEBUG", "1")
    with pytest.raises(U2AUserError, match="--model_name_or_path is required"):
        main(["train"])


def test_user_error_rule():
    from trl_u2a.prepare_data import HubUnreachableError

    assert is_user_error(FileNotFoundError("x")) and is_user_error(NotADirectoryError("x"))
    assert is_user_error(HubUnreachableError("x")) and is_user_error(ImportError('pip install -e ".[demo]"'))
    assert not is_user_error(ImportError("cannot import name 'x'")) and not is_user_error(TypeError("x"))


def test_version(capsys):
    from trl_u2a import __version__

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"trl-u2a {__version__}"


def test_score_usage_shows_config_and_a_one_file_alignment_set_uses_its_only_split(tiny_model_path, tmp_path, capsys):
    assert "--config" in score_parser(prog="trl-u2a score").format_usage()
    pairs, negatives = tmp_path / "pairs.jsonl", tmp_path / "negatives.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n"
                             for p, c, r in zip(PROMPTS, CHOSEN, REJECTED)))  # fmt: skip
    negatives.write_text("".join(json.dumps({"prompt": p, "completion": r}) + "\n" for p, r in zip(PROMPTS, REJECTED)))
    config = tmp_path / "score.yaml"
    config.write_text(f"model_name_or_path: {tiny_model_path}\ndataset_name: {negatives}\nmax_length: 64\n")
    out = tmp_path / "scores.jsonl"
    argv = ["score", "--config", str(config), "--alignment_dataset_name", str(pairs), "--output", str(out)]
    assert main(argv) == 0  # the split of pairs.jsonl is "train", not the default --alignment_split "alignment"
    scored = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(scored) == len(PROMPTS) and all("score" in row for row in scored)
    assert f"Scored {len(PROMPTS)} negatives" in capsys.readouterr().out
