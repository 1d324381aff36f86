"""Bad inputs a user could plausibly give: each gets one error (or warning) naming the field, row or file, the value
seen and what is expected, raised where the input enters (docs/reliability.md, "Bad inputs")."""

import copy
import logging
import os

import pytest
from conftest import CHOSEN, PROMPTS, REJECTED, cpu_args
from datasets import Dataset

from trl_u2a import U2AConfig, U2ATrainer
from trl_u2a import data as u2a_data
from trl_u2a.checks import (
    check_causal_lm,
    check_model_source,
    check_output_dir,
    check_prepare_output_dir,
    load_data_file,
    read_text_file,
)
from trl_u2a.safe_state import STATE_JSON, STATE_TENSORS, TRAINER_STATE
from trl_u2a.testing import cpu_training_args


def _negatives(**columns):
    return Dataset.from_dict({"prompt": PROMPTS, "completion": REJECTED, **columns})


def _chat(role, text="Hello there."):
    return [{"role": role, "content": text}]


# ------------------------------------------------------------------------------------------ runs lost or overwritten
def _fake_checkpoint(output_dir, step=2):
    path = os.path.join(output_dir, f"checkpoint-{step}")
    os.makedirs(path)
    for name in (STATE_JSON, STATE_TENSORS, TRAINER_STATE):
        with open(os.path.join(path, name), "w") as f:
            f.write("{}")
    return path


def test_a_run_into_a_folder_holding_a_checkpoint_is_refused_unless_resumed_or_overwritten(tmp_path):
    checkpoint = _fake_checkpoint(tmp_path)
    with pytest.raises(ValueError, match=rf"output_dir '{tmp_path}' already holds a run \({checkpoint}\).*--resume"):
        check_output_dir(str(tmp_path))
    with pytest.raises(ValueError, match="already holds a run"):
        check_output_dir(str(tmp_path), resume_from_checkpoint="false")  # the command line's "no resume"
    check_output_dir(str(tmp_path), resume_from_checkpoint=True)
    check_output_dir(str(tmp_path), overwrite_output_dir=True)


def test_a_run_into_a_folder_holding_a_saved_model_is_refused(tmp_path):
    check_output_dir(str(tmp_path))  # an empty folder is fine
    (tmp_path / "u2a_trace.jsonl").write_text("")  # a run that saved no model or checkpoint is not in the way
    check_output_dir(str(tmp_path))
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors.*overwrite_output_dir"):
        check_output_dir(str(tmp_path))


def test_trainer_train_refuses_to_overwrite_an_earlier_model(tiny_model_path, tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    trainer = U2ATrainer(model=tiny_model_path, args=cpu_args(tmp_path, max_steps=1), train_dataset=_negatives())
    with pytest.raises(ValueError, match="already holds a run"):
        trainer.train()
    overwrite = cpu_args(tmp_path, max_steps=1, overwrite_output_dir=True)
    U2ATrainer(model=tiny_model_path, args=overwrite, train_dataset=_negatives()).train()


def test_output_dir_that_is_a_file_is_refused(tiny_model_path, tmp_path):
    path = tmp_path / "out"
    path.write_text("x")
    with pytest.raises(NotADirectoryError, match=f"output_dir '{path}' is an existing file; expected a directory"):
        check_output_dir(str(path))
    with pytest.raises(NotADirectoryError, match=f"--output_dir '{path}' is an existing file"):
        check_prepare_output_dir(str(path), "u2a_prepare_data.json")
    with pytest.raises(NotADirectoryError, match=f"output_dir '{path}' is an existing file"):
        U2ATrainer(model=tiny_model_path, args=cpu_args(path), train_dataset=_negatives())


def test_prepare_data_refuses_a_folder_that_is_not_its_own_output(tmp_path):
    from trl_u2a.prepare_data import MANIFEST, prepare_data

    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match=f"--output_dir '{tmp_path}' is not empty and holds no earlier prepare-data"):
        prepare_data("unused.jsonl", str(tmp_path))  # refused before the dataset is looked at
    (tmp_path / MANIFEST).write_text("{}")
    check_prepare_output_dir(str(tmp_path), MANIFEST)  # its own earlier output may be replaced


# ------------------------------------------------------------------------------------------------ models and files
def _save_classifier(path):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    config = LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_labels=2
    )
    model = LlamaForSequenceClassification(config)
    model.save_pretrained(path)
    return model


def test_a_sequence_classification_model_is_refused(tmp_path):
    model = _save_classifier(tmp_path)
    with pytest.raises(ValueError, match=rf"model '{tmp_path}' is a LlamaForSequenceClassification, not a causal"):
        U2ATrainer(model=str(tmp_path), args=cpu_args(tmp_path / "out"), train_dataset=_negatives())
    with pytest.raises(ValueError, match="'LlamaForSequenceClassification' is a LlamaForSequenceClassification"):
        check_causal_lm(model)


def test_score_refuses_a_classifier_and_a_bad_config_before_loading(tmp_path):
    from trl_u2a.scripts.score import cli

    _save_classifier(tmp_path / "rm")
    argv = ["--model_name_or_path", str(tmp_path / "rm"), "--dataset_name", "trl-u2a/synthetic"]
    with pytest.raises(ValueError, match=r"--model_name_or_path '.*rm' is a LlamaForSequenceClassification"):
        cli([*argv, "--output", str(tmp_path / "scores.jsonl")])
    (tmp_path / "score.yaml").write_bytes(b"\x00\xff")
    with pytest.raises(ValueError, match=r"--config '.*score\.yaml' is not UTF-8 text"):
        cli(["--config", str(tmp_path / "score.yaml")])


def test_a_model_path_typo_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"model_name_or_path './no-such-model': no such directory"):
        check_model_source("./no-such-model")
    with pytest.raises(FileNotFoundError, match="'runs/a/b': no such directory"):
        check_model_source("runs/a/b")
    check_model_source("Qwen/Qwen2.5-0.5B-Instruct")  # a hub id is left to from_pretrained
    with pytest.raises(FileNotFoundError, match="no such directory"):
        U2ATrainer(model=str(tmp_path / "typo"), args=cpu_args(tmp_path), train_dataset=_negatives())


def test_a_latin1_jsonl_names_the_file_and_byte(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b'{"prompt": "Hi", "completion": "ok"}\n{"prompt": "caf\xe9", "completion": "no"}\n')
    with pytest.raises(ValueError, match=rf"--dataset_name '{path}' is not UTF-8 text: byte 52 \(line 2\) is 0xe9"):
        load_data_file(str(path), "--dataset_name")


def test_a_lone_surrogate_escape_names_the_file_and_byte(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"prompt": "Hi", "completion": "ok \\ud83d"}\n')
    with pytest.raises(ValueError, match=r"lone surrogate escape '\\\\ud83d' at byte 35 \(line 1\)"):
        load_data_file(str(path), "--dataset")


def test_a_paired_surrogate_escape_loads(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"prompt": "Hi", "completion": "ok \\ud83d\\ude00"}\n')
    assert load_data_file(str(path), "--dataset")["train"][0]["completion"] == "ok \U0001f600"


def test_a_missing_data_file_is_named(tmp_path):
    from trl_u2a.prepare_data import load_source
    from trl_u2a.scripts.u2a import load_dataset_any

    with pytest.raises(FileNotFoundError, match=r"--dataset_name '\./nope\.jsonl' looks like a local data file, but"):
        load_dataset_any("./nope.jsonl")
    with pytest.raises(FileNotFoundError, match=r"--alignment_dataset_name '\./data/pku': no such file or directory"):
        load_dataset_any("./data/pku", flag="--alignment_dataset_name")
    with pytest.raises(FileNotFoundError, match=r"--dataset '\./nope\.jsonl' looks like a local data file, but"):
        load_source("./nope.jsonl")


@pytest.mark.parametrize(
    "kind, error, message",
    [
        ("missing", FileNotFoundError, ": no such file"),
        ("directory", ValueError, " is a directory; expected a YAML file"),
        ("binary", ValueError, r" is not UTF-8 text \(byte 1 is 0xff\); expected a YAML file"),
    ],
)
def test_a_bad_config_file_is_named(tmp_path, kind, error, message):
    from trl_u2a.scripts.u2a import make_parser

    path = tmp_path / "recipe.yaml"
    if kind == "directory":
        path.mkdir()
    elif kind == "binary":
        path.write_bytes(b"\x00\xff\xfe binary")
    with pytest.raises(error, match=f"--config '{path}'{message}"):
        make_parser(prog="trl-u2a train").parse_args_and_config(["--config", str(path)])
    with pytest.raises(error, match=message):
        read_text_file(str(path), "--config")


def test_a_tokenizer_without_pad_and_eos_is_refused(tokenizer):
    from trl_u2a import score_negatives

    bare = copy.deepcopy(tokenizer)
    bare.pad_token = None
    bare.eos_token = None
    with pytest.raises(ValueError, match=r"has neither a pad token nor an EOS token \(pad_token=None, eos_token=None"):
        u2a_data.check_tokenizer(bare)
    with pytest.raises(ValueError, match=r"tokenizer .* has neither a pad token nor an EOS token"):
        score_negatives(None, bare, _negatives(), Dataset.from_dict({"chosen": CHOSEN, "rejected": REJECTED}))
    only_eos = copy.deepcopy(tokenizer)
    only_eos.pad_token = None
    assert u2a_data.check_tokenizer(only_eos) == tokenizer.eos_token_id  # TRL's fallback


# ------------------------------------------------------------------------------------------------------- the rows
@pytest.mark.parametrize(
    "prompt, completion, message",
    [
        (_chat("robot"), _chat("assistant"), r"column 'prompt' row 0 has a message with role 'robot'; expected one"),
        (
            _chat("human"),
            _chat("gpt"),
            r"column 'prompt' row 0 has role 'human', ShareGPT's name.*'human' -> 'user', 'gpt' ->",
        ),
        (
            [{"content": "Hi"}],
            _chat("assistant"),
            r"column 'prompt' row 0 has a message with no 'role' key; expected one of \['system'",
        ),
        (_chat("user"), _chat("user"), r"column 'completion' row 0 has a turn by 'user'; a response is the assistant"),
        (_chat("user"), _chat("system"), "column 'completion' row 0 has a turn by 'system'"),
    ],
)
def test_bad_chat_roles_are_refused(prompt, completion, message):
    rows = Dataset.from_list([{"prompt": prompt, "completion": completion}] * 2)
    with pytest.raises(ValueError, match=f"train_dataset: {message}"):
        u2a_data.to_unpaired(rows, "train_dataset")


def test_an_implicit_prompt_pair_must_end_with_the_assistant():
    pairs = Dataset.from_list([{"chosen": _chat("user") + _chat("user", "a"), "rejected": _chat("user")}])
    with pytest.raises(ValueError, match="column 'chosen' row 0 has its last turn by 'user'"):
        u2a_data.check_preference(pairs)


def test_a_completion_of_control_characters_is_refused():
    rows = _negatives(completion=["\x00\x00\x00", *REJECTED[1:]])
    with pytest.raises(
        ValueError, match=r"column 'completion' has no visible character \(control characters only\) at row 0"
    ):
        u2a_data.to_unpaired(rows, "train_dataset")
    fine = _negatives(completion=["\x00 no", *REJECTED[1:]])
    assert len(u2a_data.to_unpaired(fine, "train_dataset")) == len(PROMPTS)


def test_a_conversational_prompt_with_a_string_completion_is_refused():
    rows = Dataset.from_dict({"prompt": [_chat("user", p) for p in PROMPTS], "completion": REJECTED})
    with pytest.raises(
        ValueError, match=r"column\(s\) \['prompt'\] hold chat messages but \['completion'\] hold plain strings"
    ):
        u2a_data.to_unpaired(rows, "train_dataset")


def test_alignment_pairs_with_chosen_equal_to_rejected_are_refused(tiny_model_path, tmp_path):
    pairs = Dataset.from_dict(
        {"prompt": PROMPTS, "chosen": CHOSEN, "rejected": [CHOSEN[0], *REJECTED[1:4], *CHOSEN[4:]]}
    )
    with pytest.raises(ValueError, match=r"alignment_dataset: row 0 \(and 2 more rows\) has chosen identical to"):
        U2ATrainer(model=tiny_model_path, args=cpu_args(tmp_path), train_dataset=_negatives(), alignment_dataset=pairs)


@pytest.mark.parametrize("with_alignment", [False, True])
def test_all_zero_weights_get_the_same_error_with_or_without_an_alignment_set(
    tiny_model_path, tmp_path, preference_dataset, with_alignment
):
    alignment = preference_dataset if with_alignment else None
    with pytest.raises(ValueError, match="Every negative has weight 0 in the 'weight' column"):
        U2ATrainer(
            model=tiny_model_path,
            args=cpu_args(tmp_path),
            train_dataset=_negatives(weight=[0] * len(PROMPTS)),
            alignment_dataset=alignment,
        )


# ------------------------------------------------------------------------------------------------------ numbers
@pytest.mark.parametrize("field", ["per_device_train_batch_size", "per_device_eval_batch_size"])
def test_a_batch_size_of_zero_is_refused(tmp_path, field):
    with pytest.raises(ValueError, match=f"{field}=0 must be an integer ≥ 1"):
        cpu_training_args(U2AConfig, output_dir=str(tmp_path), **{field: 0})


@pytest.mark.parametrize(
    "kwargs, message", [({"batch_size": 0}, "batch_size=0 must be an integer ≥ 1"), ({"beta": -1.0}, "beta=-1.0 must")]
)
def test_score_negatives_refuses_what_u2a_config_refuses(tokenizer, tmp_path, kwargs, message):
    from trl_u2a import score_negatives

    key = "per_device_train_batch_size" if "batch_size" in kwargs else "beta"
    with pytest.raises(ValueError, match=message.replace("batch_size", key)):
        cpu_training_args(U2AConfig, output_dir=str(tmp_path), **{key: next(iter(kwargs.values()))})
    with pytest.raises(ValueError, match=message):
        score_negatives(
            None, tokenizer, _negatives(), Dataset.from_dict({"chosen": CHOSEN, "rejected": REJECTED}), **kwargs
        )


def test_a_warmup_beyond_the_run_warns_and_the_plan_says_there_is_no_selection(
    tiny_model_path, tmp_path, preference_dataset, caplog
):
    args = cpu_args(tmp_path, max_steps=3, reweight_warmup_steps=5)
    trainer = U2ATrainer(
        model=tiny_model_path, args=args, train_dataset=_negatives(), alignment_dataset=preference_dataset
    )
    with caplog.at_level(logging.INFO, logger="trl_u2a"):
        trainer.train()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(
        "reweight_warmup_steps=5 is at or beyond the end of the run (3 optimizer steps): the initial pass moves to "
        "after step 2, so 2 of the 3 steps unlearn every negative" in w
        for w in warnings
    ), warnings
    plan = [r.getMessage() for r in caplog.records if r.getMessage().startswith("U2A: the initial pass")]
    assert plan and "after step 2 (the warm-up covers the run: steps 1-2 train every negative, no selection)" in plan[0]


def test_a_warmup_inside_the_run_does_not_warn(tiny_model_path, tmp_path, preference_dataset, caplog):
    args = cpu_args(tmp_path, max_steps=3, reweight_warmup_steps=1)
    trainer = U2ATrainer(
        model=tiny_model_path, args=args, train_dataset=_negatives(), alignment_dataset=preference_dataset
    )
    with caplog.at_level(logging.INFO, logger="trl_u2a"):
        trainer.train()
    assert not any("reweight_warmup_steps" in r.getMessage() for r in caplog.records)
    assert any(r.getMessage().startswith("U2A: the initial pass after step 1, then") for r in caplog.records)


# ------------------------------------------------------------------------------------------------ evaluate and demo
@pytest.mark.parametrize("threshold", [5.0, 0.0, -0.5])
def test_a_harm_threshold_outside_the_judges_range_is_refused(tokenizer, threshold):
    from trl_u2a.evaluation import Evaluator, lexical_judge

    prompts = Dataset.from_dict({"prompt": PROMPTS})
    with pytest.raises(ValueError, match=rf"harm_threshold={threshold} is outside the judge's range.*\(0, 1\]"):
        Evaluator(tokenizer, prompts=prompts, judge=lexical_judge, harm_threshold=threshold)


def test_evaluate_refuses_the_harm_threshold_before_loading_anything(tmp_path):
    from trl_u2a.scripts.evaluate import evaluate, make_parser

    argv = [
        "--model_name_or_path",
        str(tmp_path / "not-loaded"),
        "--prompts",
        "not-read.jsonl",
        "--harm_threshold",
        "5",
    ]
    with pytest.raises(ValueError, match=r"harm_threshold=5\.0 is outside the judge's range"):
        evaluate(make_parser().parse_args(argv))


def test_a_causal_lm_as_judge_is_refused(tiny_model_path, tmp_path):
    from trl_u2a.evaluation import load_judge

    with pytest.raises(ValueError, match=rf"--judge '{tiny_model_path}' is a LlamaForCausalLM, not a text-classifi"):
        load_judge(tiny_model_path)


def test_demo_steps_zero_is_refused():
    from trl_u2a.demo.config import DemoConfig

    with pytest.raises(ValueError, match=r"steps=0 must be an integer ≥ 1: the optimizer steps of every method"):
        DemoConfig.quick(steps=0)
