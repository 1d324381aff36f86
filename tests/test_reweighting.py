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
from trl_u2a.core.modeling import fill_reference_logps
from trl_u2a.core.objectives import DPOObjective
from trl_u2a.data import PairCollator, tokenize_pairs

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
        args=cpu_args(
            tmp_path / "u2a",
            budget=6,
            reweight_steps=2,
            weight_lr=0.5,
            preconditioner="identity",
            pa_samples=6,  # every pair: each helpful negative matches one pair here, so a sample would miss some
            pool_size=6,
            **common,
        ),
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
    # The user's `id` column names each negative in the trace
    negatives = negatives.add_column("id", [f"neg-{i}" for i in range(len(negatives))])
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
    assert {"example_id", "score", "weight", "step", "id"} <= set(rows[0])
    assert all(r["id"] == f"neg-{r['example_id']}" for r in rows)
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
    second = trainer.refresh_callback.history[1]
    assert second["num_scored_in_training"] >= 2
    # Each refresh's scores, from the trace (memory keeps only the latest refresh's)
    scores: dict[int, dict[int, float]] = {0: {}, 1: {}}
    for line in (tmp_path / "u2a_trace.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row["score"] is not None and row["refresh"] in scores:
            scores[row["refresh"]][row["example_id"]] = row["score"]
    assert scores[1] == {int(i): s for i, s in second["last_scores"].items()}
    compared = 0
    for i, s in scores[1].items():
        if i in scores[0]:
            assert s == pytest.approx(scores[0][i], rel=1e-4, abs=1e-6)
            compared += 1
    assert compared == len(scores[1])


def test_patience_stops_training_with_a_reason(tiny_model_path, tmp_path, planted, caplog):
    negatives, alignment = planted
    args = cpu_args(tmp_path, loss_type="ga", reweight_steps=1, max_steps=10, learning_rate=0.0, patience=2)
    trainer = U2ATrainer(model=tiny_model_path, args=args, train_dataset=negatives, alignment_dataset=alignment)
    trainer.train()
    assert trainer.state.global_step == 2  # J never improves at lr 0: refreshes at steps 1 and 2 count
    stopped, final = trainer.refresh_callback.history[-2:]
    assert "has not improved for 2 refreshes" in stopped["stopped"]
    # An early stop ends with the final record too, as a run that reaches max_steps does
    assert final["final"] and final["step"] == 2
    written = [json.loads(line) for line in open(tmp_path / "u2a_refreshes.jsonl")]
    assert written[-1]["final"] and written[-1]["objective"] == pytest.approx(final["objective"])


@pytest.mark.parametrize("reweight_steps, plots", [(1, True), (None, False)])
def test_refresh_cost_is_recorded_and_only_a_fixed_cadence_over_the_bound_warns(
    tiny_model_path, tmp_path, planted, caplog, monkeypatch, reweight_steps, plots
):
    """Each refresh records its wall time and the training window's before it; the end of training reports the
    initial pass and the later refreshes' share. A fixed cadence whose refreshes cost more than `reweight_overhead`
    of the training warns once; the default schedule never does. The clock is faked: every refresh takes 0.5 s,
    every window before one 1 s (the first from the start of training). The second case also switches the
    end-of-training plots off."""
    import types

    import trl_u2a.refresh.controller as callback_module
    from trl_u2a.core.schedule import refresh_steps

    def ticks():  # the clock read at the start of training, then at the start and at the end of each refresh
        now = 0.0
        while True:
            yield now
            now += 1.0
            yield now
            now += 0.5

    clock = ticks()
    monkeypatch.setattr(callback_module, "time", types.SimpleNamespace(perf_counter=lambda: next(clock)))
    negatives, alignment = planted
    args = cpu_args(
        tmp_path,
        loss_type="ga",
        reweight_steps=reweight_steps,
        reweight_overhead=0.5,
        max_steps=12,
        budget=6,
        auto_budget=False,  # exactly 6 selected, so that each refresh's row passes are known
        per_device_train_batch_size=4,
        pa_samples=2,
        pool_size=2,
        preconditioner="identity",
        save_refresh_plots=plots,
    )
    trainer = U2ATrainer(model=tiny_model_path, args=args, train_dataset=negatives, alignment_dataset=alignment)
    with caplog.at_level("WARNING"):
        trainer.train()
    assert (tmp_path / "u2a_plots").is_dir() == plots
    assert (tmp_path / "u2a_refreshes.jsonl").exists()
    history = [r for r in trainer.refresh_callback.history if not r.get("final")]
    # Full fine-tuning rescores the 6 selected: 2 x 2 pairs + 2 pool + 6 = 12 row passes against 4 rows a step
    expected = list(range(1, 12)) if reweight_steps else refresh_steps(12, 4, 12, 0.5)
    assert [r["step"] for r in history] == [0, *expected]
    assert len(expected) >= 1
    assert all(r["refresh_seconds"] == pytest.approx(0.5) for r in history)
    assert all(r["window_seconds"] == pytest.approx(1.0) for r in history)
    warnings = [m for m in caplog.messages if "each refresh costs about 12 row passes" in m]
    assert len(warnings) == (1 if reweight_steps else 0)
    last = trainer.refresh_callback.history[-1]
    with open(tmp_path / "u2a_refreshes.jsonl") as f:
        written = json.loads(f.readlines()[-1])
    assert last["final"] and written["reweight_share"] == last["reweight_share"]
    windows = len(history) * 1.0
    assert last["reweight_share"] == pytest.approx(0.5 * len(expected) / windows)
    # 0.5 s against (the windows' seconds per trained row: 4 rows a step) x the 12 candidates of the initial pass
    seconds_per_row = windows / (expected[-1] * 4)
    assert last["initial_pass_multiple"] == pytest.approx(0.5 / (seconds_per_row * 12))
    assert any("u2a/refresh_seconds" in entry for entry in trainer.state.log_history)


@pytest.mark.parametrize(
    "schedule, resume_step",
    [
        (dict(reweight_steps=2, max_steps=6), 3),
        # the package defaults' warm-up and cadence, resumed inside the warm-up (the initial pass is after step 4)
        (dict(reweight_warmup_steps=0.5, max_steps=8, reweight_overhead=0.6), 2),
    ],
)
def test_resume_from_checkpoint_continues_exactly(tiny_model_path, tmp_path, planted, schedule, resume_step):
    from peft import LoraConfig

    negatives, alignment = planted

    def run(output_dir, resume=None):
        args = cpu_args(
            output_dir, loss_type="npo", budget=6, save_strategy="steps", save_steps=resume_step, **schedule
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
    checkpoint = str(tmp_path / "full" / f"checkpoint-{resume_step}")
    resumed_weights, resumed_adapter = run(tmp_path / "resumed", resume=checkpoint)
    assert (weights == 0).any()  # a selection happened after the resume point
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
        # Adam turns reduction-order differences in near-zero gradients into relative differences of its update
        torch.testing.assert_close(torch.tensor(b["params"][name]), torch.tensor(value), rtol=0, atol=5e-5)


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


def test_no_positive_score_after_the_warm_up_stops_cleanly(tiny_model_path, tmp_path):
    """The same negatives with a warm-up: the warm-up's steps are not lost to an error. Training stops at the initial
    pass with the reason in the record, a final record, and a model that saves."""
    alignment = Dataset.from_dict({"prompt": PROMPTS, "chosen": CHOSEN, "rejected": REJECTED})
    negatives = Dataset.from_dict({"prompt": PROMPTS, "completion": CHOSEN})
    args = cpu_args(tmp_path, loss_type="ga", preconditioner="identity", max_steps=8, reweight_warmup_steps=2)
    trainer = U2ATrainer(model=tiny_model_path, args=args, train_dataset=negatives, alignment_dataset=alignment)
    trainer.train()
    assert trainer.state.global_step == 2
    initial, final = trainer.refresh_callback.history
    assert initial["step"] == 2 and initial["n_selected"] == 0
    assert initial["stopped"].startswith("no negative has a positive influence score at the initial pass (6 scored")
    assert final["final"] and final["step"] == 2
    written = [json.loads(line) for line in open(tmp_path / "u2a_refreshes.jsonl")]
    assert written[-1]["final"] and "initial pass" in written[0]["stopped"]
    trainer.save_model(str(tmp_path / "saved"))
    assert (tmp_path / "saved" / "model.safetensors").exists()


@pytest.mark.parametrize("loss_type", ["ga", "npo"])
def test_precision_holds_when_the_preconditioner_changes_between_refreshes(tiny_model_path, tmp_path, loss_type):
    """LoRA (in-training scores on): refresh 0 scores with the identity preconditioner (no optimizer state, no
    estimate), refresh 1 computes an Adam query whose scores are on another scale. Ranking the in-training scores
    (identity query) beside pool scores taken with the Adam query let the pool's neutral negatives displace helpful
    ones (precision 0.67 -> 0.50 with ga, 0.83 -> 0.33 with npo before the fix); one query per ranking keeps it."""
    from peft import LoraConfig

    # 0-5 help (the alignment set's rejected responses), 6-11 hurt (its chosen ones), 12-17 are rude answers to
    # other prompts: neutral to mildly helpful
    negatives = Dataset.from_dict(
        {"prompt": PROMPTS * 3, "completion": REJECTED + CHOSEN + REJECTED[1:] + REJECTED[:1]}
    )
    alignment = Dataset.from_dict({"prompt": PROMPTS, "chosen": CHOSEN, "rejected": REJECTED})
    args = cpu_args(
        tmp_path,
        loss_type=loss_type,
        budget=6,
        auto_budget=False,  # 6 selected, each scored in training before the second refresh
        reweight_steps=2,
        max_steps=6,
        weight_lr=0.0,
        pool_size=12,
        pa_samples=6,
        preconditioner="adam",
        preconditioner_batches=0,
        learning_rate=1e-3,
    )
    lora = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM", init_lora_weights=False)
    trainer = U2ATrainer(
        model=tiny_model_path, args=args, train_dataset=negatives, alignment_dataset=alignment, peft_config=lora
    )
    trainer.train()
    history = [r for r in trainer.refresh_callback.history if not r.get("final")]
    assert [r["step"] for r in history] == [0, 2, 4]
    assert [r["preconditioner"] for r in history] == ["identity", "adam", "adam"]
    # Refresh 1 ranks its in-training scores and its pool with the query they share: refresh 0's
    assert [r["ranked_with_query_of"] for r in history] == [0, 0, 1]
    assert history[1]["ranking_preconditioner"] == "identity" and history[1]["num_scored_in_training"] == 6
    precision = []
    for record in history:
        selected = torch.tensor(record["weights"]) > 0
        precision.append(float(selected[:6].sum() / selected.sum()))
    assert precision[1] >= precision[0] >= 0.6
    assert min(precision) >= 0.6  # base rate 1/3


def test_initial_pass_follows_the_warm_up_against_the_start_model(tiny_model_path, tmp_path, planted):
    """`reweight_warmup_steps=0.25` of 8 steps: plain unlearning of every negative for 2 steps, then the initial pass
    scores all of them with Adam's real state. Full fine-tuning has no reference adapter: J's reference log-probs
    are the start model's, taken before the first step (after the warm-up the policy has moved, so J ≠ ln 2)."""
    import math

    negatives, alignment = planted
    args = cpu_args(
        tmp_path,
        loss_type="ga",
        budget=6,
        max_steps=8,
        reweight_warmup_steps=0.25,
        learning_rate=3e-3,
        pa_samples=6,
        pool_size=6,
    )
    trainer = U2ATrainer(model=tiny_model_path, args=args, train_dataset=negatives, alignment_dataset=alignment)
    seen = []
    original = trainer.compute_loss

    def spy(model, inputs, *rest, **kwargs):
        if model.training:
            seen.append((trainer.state.global_step, inputs["negative_id"].tolist()))
        return original(model, inputs, *rest, **kwargs)

    trainer.compute_loss = spy
    trainer.train()
    history = [r for r in trainer.refresh_callback.history if not r.get("final")]
    assert history[0]["step"] == 2 and history[0]["num_scored"] == 12
    assert history[0]["preconditioner"] == "adam"
    assert abs(history[0]["objective"] - math.log(2)) > 1e-3
    # The warm-up trains the initial (uniform) weights, so also negatives that the initial pass then drops; after it
    # (past the one batch the data loader may have drawn before the refresh) only selected ones are trained
    selected = set(torch.nonzero(torch.tensor(history[0]["weights"]) > 0).flatten().tolist())
    assert len(selected) < 12
    assert {i for step, ids in seen if step < 2 for i in ids} - selected
    end = history[1]["step"] if len(history) > 1 else 8
    assert all(set(ids) <= selected for step, ids in seen if 3 <= step < end)


def test_each_refresh_is_logged_once_unaveraged(tiny_model_path, tmp_path, planted):
    """Refreshes at steps 0, 1, 2, 3 inside one logging window of 4 steps: each refresh's J is its own log entry at
    its step, not the mean of the window's (the first logged J is ln 2, as the quickstart says)."""
    import math

    negatives, alignment = planted
    args = cpu_args(
        tmp_path, loss_type="ga", budget=6, reweight_steps=1, max_steps=5, logging_steps=4, learning_rate=3e-3
    )
    trainer = U2ATrainer(model=tiny_model_path, args=args, train_dataset=negatives, alignment_dataset=alignment)
    trainer.train()
    logged = [
        (entry["step"], entry["u2a/objective"]) for entry in trainer.state.log_history if "u2a/objective" in entry
    ]
    history = trainer.refresh_callback.history
    assert logged == [(r["step"], pytest.approx(r["objective"])) for r in history]
    assert logged[0] == (0, pytest.approx(math.log(2), abs=1e-6))
    assert len({value for _, value in logged}) == len(logged)
