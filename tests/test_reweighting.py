"""The bi-level refresh: selection on a planted task, multi-process equality, exact resume, logs, early stopping."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import CHOSEN, PROMPTS, REJECTED, cpu_args
from datasets import Dataset

from trl_u2a import U2ATrainer
from trl_u2a.data import PairCollator, tokenize_pairs
from trl_u2a.modeling import fill_reference_logps
from trl_u2a.objectives import DPOObjective

HERE = os.path.dirname(__file__)


@pytest.fixture
def planted():
    """Negatives 0-5 are the alignment set's rejected responses (unlearning them helps); 6-11 are its chosen
    responses (unlearning them hurts)."""
    alignment = Dataset.from_dict({"prompt": PROMPTS, "chosen": CHOSEN, "rejected": REJECTED})
    negatives = Dataset.from_dict({"prompt": PROMPTS + PROMPTS, "completion": REJECTED + CHOSEN})
    return negatives, alignment


def alignment_objective(model, tokenizer, start_model, alignment):
    """J = mean DPO loss of `model` on `alignment` against `start_model`."""
    pairs = tokenize_pairs(alignment, tokenizer, 64, "alignment")
    batch = PairCollator(tokenizer.pad_token_id, 64)([pairs[i] for i in range(len(pairs))])
    batch = fill_reference_logps(start_model, [batch], prefixes=("chosen_", "rejected_"))[0]
    with torch.no_grad():
        return DPOObjective(0.1)(model.eval(), batch).mean().item()


def test_selection_precision_weights_and_objective_on_planted_task(tiny_model_path, tokenizer, tmp_path, planted):
    from transformers import AutoModelForCausalLM

    negatives, alignment = planted
    common = dict(loss_type="npo", max_steps=8, learning_rate=3e-3, per_device_train_batch_size=4)
    trainer = U2ATrainer(
        model=tiny_model_path,
        args=cpu_args(tmp_path / "u2a", budget=6, reweight_steps=2, weight_lr=0.5, preconditioner="identity", **common),
        train_dataset=negatives,
        alignment_dataset=alignment,
    )
    trainer.train()
    history = trainer.refresh_callback.history
    assert [r["step"] for r in history] == [0, 2, 4, 6, 8]  # refreshes, then J at the end
    assert history[-1]["final"]
    history = history[:-1]

    helpful = torch.arange(12) < 6
    first = torch.tensor(history[0]["weights"])
    precision = (first[helpful] > 0).sum() / (first > 0).sum()
    assert precision >= 0.9
    # Weight mass on the helpful half: 0.5 under uniform weights, then at least 0.9 at every refresh
    for record in history:
        w = torch.tensor(record["weights"])
        assert w[helpful].sum() / w.sum() >= 0.9
    assert trainer.refresh_callback.history[-1]["objective"] < history[-1]["objective"] < history[0]["objective"]

    uniform = U2ATrainer(model=tiny_model_path, args=cpu_args(tmp_path / "uniform", **common), train_dataset=negatives)
    uniform.train()
    start = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    tok = trainer.processing_class
    j_u2a = alignment_objective(trainer.model, tok, start, alignment)
    j_uniform = alignment_objective(uniform.model, tok, start, alignment)
    assert j_u2a < j_uniform - 0.01


def test_trace_plots_and_logged_metrics(tiny_model_path, tmp_path, planted):
    negatives, alignment = planted
    trainer = U2ATrainer(
        model=tiny_model_path,
        args=cpu_args(tmp_path, loss_type="ga", budget=0.5, reweight_steps=2, max_steps=4),
        train_dataset=negatives,
        alignment_dataset=alignment,
    )
    trainer.train()
    with open(tmp_path / "u2a_trace.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert {r["refresh"] for r in rows} == {0, 1}  # steps 0 and 2; none at the last step, whose weights go unused
    assert {"example_id", "score", "weight", "step"} <= set(rows[0])
    # At refresh 0 every negative was scored
    assert sorted(r["example_id"] for r in rows if r["refresh"] == 0) == list(range(12))
    for name in ("objective.png", "weights.png", "scores.png"):
        assert (tmp_path / "u2a_plots" / name).stat().st_size > 1000
    logged = {k for entry in trainer.state.log_history for k in entry}
    assert {"u2a/objective", "u2a/n_selected", "u2a/entropy", "u2a/score_median", "u2a/objective_change"} <= logged
    # Full fine-tuning trains the LM head, which TRL's fused head reads without calling the module: no in-training
    # scores, every selected negative is rescored
    second = trainer.refresh_callback.history[1]
    assert second["num_scored_in_training"] == 0 and second["num_scored"] >= second["n_selected"]


@pytest.mark.parametrize("loss_type", ["npo", "graddiff"])
def test_in_training_scores_match_a_fresh_scoring_pass(tiny_model_path, tmp_path, planted, loss_type):
    """With lr=0 the model does not move, so the scores recorded during training equal a refresh's own scores."""
    from peft import LoraConfig

    negatives, alignment = planted
    if loss_type == "graddiff":  # retain rows in the batches, whose rows must not be mistaken for negatives
        negatives = Dataset.from_dict(
            {"prompt": PROMPTS * 3, "completion": REJECTED + CHOSEN + CHOSEN, "label": [False] * 12 + [True] * 6}
        )
    args = cpu_args(
        tmp_path,
        loss_type=loss_type,
        budget=6,
        reweight_steps=1,
        max_steps=2,
        learning_rate=0.0,
        preconditioner="identity",
        weight_lr=0.0,
    )
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM", init_lora_weights=False)
    trainer = U2ATrainer(
        model=tiny_model_path, args=args, train_dataset=negatives, alignment_dataset=alignment, peft_config=lora
    )
    trainer.train()
    first, second = trainer.refresh_callback.history[:2]
    assert second["num_scored_in_training"] >= 2
    compared = 0
    for i, s in second["last_scores"].items():
        if i in first["last_scores"]:
            assert s == pytest.approx(first["last_scores"][i], rel=1e-4, abs=1e-6)
            compared += 1
    assert compared == len(second["last_scores"])


def test_patience_stops_training_with_a_reason(tiny_model_path, tmp_path, planted, caplog):
    negatives, alignment = planted
    args = cpu_args(tmp_path, loss_type="ga", reweight_steps=1, max_steps=10, learning_rate=0.0, patience=2)
    trainer = U2ATrainer(model=tiny_model_path, args=args, train_dataset=negatives, alignment_dataset=alignment)
    trainer.train()
    assert trainer.state.global_step == 2  # J never improves at lr 0: refreshes at steps 1 and 2 count
    assert "has not improved for 2 refreshes" in trainer.refresh_callback.history[-1]["stopped"]


@pytest.mark.parametrize("refresh_seconds, warned", [(1.0, True), (0.1, False)])
def test_refresh_time_is_logged_and_a_costly_refresh_warns_once_and_plots_can_be_off(
    tiny_model_path, tmp_path, planted, caplog, monkeypatch, refresh_seconds, warned
):
    """Each refresh records its wall time and the training window's before it; a refresh costing more than a quarter
    of its window warns once. The clock is faked: every refresh takes `refresh_seconds`, every window 1 s."""
    import types

    import trl_u2a.callback as callback_module

    def ticks():  # the clock read at the start and at the end of each refresh
        now = 0.0
        while True:
            yield now
            now += refresh_seconds
            yield now
            now += 1.0

    clock = ticks()
    monkeypatch.setattr(callback_module, "time", types.SimpleNamespace(perf_counter=lambda: next(clock)))
    negatives, alignment = planted
    # The second case also switches the end-of-training plots off (same short run)
    plots = warned
    args = cpu_args(
        tmp_path,
        loss_type="ga",
        reweight_steps=1,
        max_steps=3,
        budget=6,
        preconditioner="identity",
        save_refresh_plots=plots,
    )
    trainer = U2ATrainer(model=tiny_model_path, args=args, train_dataset=negatives, alignment_dataset=alignment)
    with caplog.at_level("WARNING"):
        trainer.train()
    assert (tmp_path / "u2a_plots").is_dir() == plots
    assert (tmp_path / "u2a_refreshes.jsonl").exists()
    history = [r for r in trainer.refresh_callback.history if not r.get("final")]
    assert len(history) == 3
    assert all(r["refresh_seconds"] == pytest.approx(refresh_seconds) for r in history)
    assert "window_seconds" not in history[0]
    assert all(r["window_seconds"] == pytest.approx(1.0) for r in history[1:])
    warnings = [m for m in caplog.messages if "of the 1.0 s that the 1 optimizer steps before it trained" in m]
    assert len(warnings) == (1 if warned else 0)
    assert any("u2a/refresh_seconds" in entry for entry in trainer.state.log_history)


def test_resume_from_checkpoint_continues_exactly(tiny_model_path, tmp_path, planted):
    from peft import LoraConfig

    negatives, alignment = planted

    def run(output_dir, resume=None):
        args = cpu_args(
            output_dir, loss_type="npo", budget=6, reweight_steps=2, max_steps=6, save_strategy="steps", save_steps=3
        )
        trainer = U2ATrainer(
            model=tiny_model_path,
            args=args,
            train_dataset=negatives,
            alignment_dataset=alignment,
            peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"),
        )
        trainer.train(resume_from_checkpoint=resume)
        adapter = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
        return trainer.weight_state.weights.clone(), adapter

    weights, adapter = run(tmp_path / "full")
    resumed_weights, resumed_adapter = run(tmp_path / "resumed", resume=str(tmp_path / "full" / "checkpoint-3"))
    torch.testing.assert_close(resumed_weights, weights, rtol=0, atol=1e-10)
    for name, value in adapter.items():
        torch.testing.assert_close(resumed_adapter[name], value, rtol=0, atol=1e-7)


def test_budget_larger_than_negatives_is_an_error(tiny_model_path, tmp_path, planted):
    negatives, alignment = planted
    with pytest.raises(ValueError, match="budget=50 is larger than the 12 negatives"):
        U2ATrainer(
            model=tiny_model_path,
            args=cpu_args(tmp_path, budget=50),
            train_dataset=negatives,
            alignment_dataset=alignment,
        )


@pytest.mark.slow
def test_two_processes_match_one_process(tiny_model_path, tmp_path):
    script = os.path.join(HERE, "scripts", "u2a_run.py")
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    subprocess.run([sys.executable, script, tiny_model_path, str(one), "4"], check=True, env=env)
    launcher = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--main_process_port",
        str(29500 + os.getpid() % 1000),
    ]
    subprocess.run([*launcher, script, tiny_model_path, str(two), "2"], check=True, env=env)
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert a["num_processes"] == 1
    assert b["num_processes"] == 2 and b["distributed_type"] == "DistributedType.MULTI_CPU" and b["backend"] == "gloo"
    # 7 negatives: the world size does not divide them
    assert len(a["weights"]) == 7
    assert [w > 0 for w in a["weights"]] == [w > 0 for w in b["weights"]]
    torch.testing.assert_close(torch.tensor(b["weights"]), torch.tensor(a["weights"]), rtol=0, atol=1e-5)
    for name, value in a["params"].items():
        torch.testing.assert_close(torch.tensor(b["params"][name]), torch.tensor(value), rtol=0, atol=1e-5)


def test_no_positive_score_at_the_start_is_a_clear_error(tiny_model_path, tmp_path):
    # Every negative is an alignment-set chosen response: unlearning any of them is predicted to hurt
    alignment = Dataset.from_dict({"prompt": PROMPTS, "chosen": CHOSEN, "rejected": REJECTED})
    negatives = Dataset.from_dict({"prompt": PROMPTS, "completion": CHOSEN})
    trainer = U2ATrainer(
        model=tiny_model_path,
        args=cpu_args(tmp_path, loss_type="ga", preconditioner="identity"),
        train_dataset=negatives,
        alignment_dataset=alignment,
    )
    with pytest.raises(ValueError, match="No negative has a positive influence score"):
        trainer.train()
