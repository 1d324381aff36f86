"""What a user reads on the console besides errors: warnings without stray source lines, a resume without a false
"missing keys" alarm, a budget hint that means what it says, a warning for a launch that runs one process, and for
training data and alignment pairs in different formats, and `demo --help` with its defaults."""

import logging
import warnings
from types import SimpleNamespace

import pytest
from conftest import CHOSEN, PROMPTS, REJECTED, cpu_args
from datasets import Dataset

from trl_u2a import U2ATrainer
from trl_u2a.data import format_mismatch
from trl_u2a.distributed import accelerate_ran_one_of_several, check_process_count
from trl_u2a.scripts.errors import run_command


def test_budget_hint_gives_a_count_and_a_fraction(tmp_path):
    # "use e.g. 1" used to be suggested for 1.5, but budget 1 is the fraction 1.0: every negative
    hint = r"budget=1.5 .* e\.g\. 2 \(negatives\) or 0\.5 \(a fraction; 1 means all\)"
    with pytest.raises(ValueError, match=hint):
        cpu_args(tmp_path, budget=1.5)
    with pytest.raises(ValueError, match=r"e\.g\. 7 \(negatives\)"):
        cpu_args(tmp_path, budget=7.2)


def test_warnings_on_the_console_have_no_source_line():
    shown_during = []

    def command(argv):
        # How Python would show a warning raised at `params = tracked_parameters(model)`
        shown_during.append(warnings.formatwarning("5 tensors are not hooked", UserWarning, "query.py", 148, "params"))
        return 0

    shown = warnings.formatwarning
    assert run_command("train", command, []) == 0
    assert shown_during == ["UserWarning: 5 tensors are not hooked\n"]
    assert warnings.formatwarning is shown  # restored for whatever runs after the command


def test_resume_of_tied_weights_does_not_warn_about_missing_keys(tiny_model_path, tmp_path, caplog):
    trainer = U2ATrainer(
        model=tiny_model_path,
        args=cpu_args(tmp_path),
        train_dataset=Dataset.from_dict({"prompt": PROMPTS, "completion": REJECTED}),
    )
    assert trainer.model.lm_head.weight is trainer.model.model.embed_tokens.weight  # tied
    with caplog.at_level(logging.WARNING):
        trainer._issue_warnings_after_load(SimpleNamespace(missing_keys=["lm_head.weight"], unexpected_keys=[]))
        assert "missing keys" not in caplog.text
        # A key that nothing else holds is still reported
        missing = ["lm_head.weight", "model.norm.weight"]
        trainer._issue_warnings_after_load(SimpleNamespace(missing_keys=missing, unexpected_keys=[]))
    assert "There were missing keys in the checkpoint model loaded: ['model.norm.weight']" in caplog.text


def test_accelerate_simple_launcher_with_several_processes_warns(monkeypatch, caplog):
    from accelerate import PartialState

    PartialState()
    accelerator = SimpleNamespace(
        num_processes=1,
        device="cpu",
        state=SimpleNamespace(distributed_type="DistributedType.NO", mixed_precision="no"),
    )
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "False")
    assert not accelerate_ran_one_of_several()  # `--num_processes 1`: no MASTER_ADDR
    # What `accelerate launch --num_processes 2` without --multi_gpu sets on a machine without a GPU
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    assert accelerate_ran_one_of_several()
    with caplog.at_level(logging.WARNING):
        check_process_count(accelerator)
    assert "asked for several processes but started one" in caplog.text and "--multi_gpu" in caplog.text


def test_conversational_training_data_beside_plain_text_pairs_warns(tiny_model_path, tmp_path, caplog):
    pairs = Dataset.from_dict({"prompt": PROMPTS, "chosen": CHOSEN, "rejected": REJECTED})
    plain = Dataset.from_dict({"prompt": PROMPTS, "completion": REJECTED})
    chat = Dataset.from_dict(
        {
            "prompt": [[{"role": "user", "content": p}] for p in PROMPTS],
            "completion": [[{"role": "assistant", "content": r}] for r in REJECTED],
        }
    )
    assert format_mismatch(plain, pairs) is None
    assert format_mismatch(chat, pairs).startswith(
        "train_dataset is conversational but alignment_dataset is plain text"
    )
    with caplog.at_level(logging.WARNING):
        U2ATrainer(model=tiny_model_path, args=cpu_args(tmp_path), train_dataset=chat, alignment_dataset=pairs)
    assert "train_dataset is conversational but alignment_dataset is plain text" in caplog.text


def test_demo_help_shows_the_defaults_of_each_preset(capsys):
    from trl_u2a.demo import DemoConfig
    from trl_u2a.scripts.demo import make_parser

    with pytest.raises(SystemExit):
        make_parser().parse_args(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    reduced, quick = DemoConfig.reduced(), DemoConfig.quick()
    assert f"(default: {reduced.steps}; --full: {DemoConfig.full().steps}; --quick: {quick.steps})" in out
    assert f"(default: {reduced.lora_learning_rates[0]};" in out and "--full: 0 1 ... 9" in out
    assert "(default: u2a-demo)" in out


def test_the_tiny_model_says_it_is_random_init_so_j_may_rise(tmp_path, monkeypatch, caplog):
    # recipes/tiny.yaml moved J from 0.77 at the initial pass to 1.02 with nothing on screen saying why
    import trl_u2a.testing
    from trl_u2a.scripts.u2a import TINY_MODEL, resolve_model

    built = []
    monkeypatch.setattr(trl_u2a.testing, "save_tiny_model", lambda path, **kwargs: built.append(path))
    logger = logging.getLogger("trl_u2a")
    logger.addHandler(caplog.handler)  # the CLI may have stopped this logger's propagation in an earlier test
    try:
        path = resolve_model(TINY_MODEL, str(tmp_path))
    finally:
        logger.removeHandler(caplog.handler)
    assert built == [path]
    assert "trl-u2a/tiny is a randomly initialised model" in caplog.text and "J (u2a/objective) may rise" in caplog.text
    assert "trl-u2a demo" in caplog.text


def test_train_with_nothing_to_select_after_the_warm_up_saves_and_says_why(tiny_model_path, tmp_path, capsys):
    """The late error that lost a run: `trl-u2a train` now ends normally, with the reason on screen, the model saved
    and the final record written."""
    import json

    from trl_u2a.cli import main

    negatives, pairs = tmp_path / "negatives.jsonl", tmp_path / "pairs.jsonl"
    # Every negative is a chosen answer of the alignment set: unlearning any of them is predicted to raise J
    negatives.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in zip(PROMPTS, CHOSEN)))
    pairs.write_text("".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n"
                             for p, c, r in zip(PROMPTS, CHOSEN, REJECTED)))  # fmt: skip
    out = tmp_path / "run"
    argv = ["train", "--model_name_or_path", tiny_model_path, "--dataset_name", str(negatives),
            "--alignment_dataset_name", str(pairs), "--output_dir", str(out), "--use_cpu", "--bf16", "false",
            "--gradient_checkpointing", "false",
            "--loss_type", "ga", "--preconditioner", "identity", "--max_steps", "8", "--reweight_warmup_steps", "2",
            "--per_device_train_batch_size", "4", "--max_length", "64", "--report_to", "none", "--save_strategy", "no",
            "--disable_tqdm", "true", "--save_refresh_plots", "false"]  # fmt: skip
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "U2A early stop at step 2: no negative has a positive influence score at the initial pass" in captured.err
    assert f"Model saved to {out}." in captured.out and (out / "model.safetensors").exists()
    records = [json.loads(line) for line in (out / "u2a_refreshes.jsonl").read_text().splitlines()]
    assert records[-1]["final"] and records[-1]["step"] == 2
