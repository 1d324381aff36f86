"""`auto_budget`: the initial pass sets the budget from its own scores (Otsu's threshold, capped by `budget`)."""

import json
import logging
import math

import pytest
import torch
from conftest import CHOSEN, PROMPTS, REJECTED
from datasets import Dataset
from test_refresh_controller import LoopHost, _args, loop_controller, tokenized_pairs

from trl_u2a import data as u2a_data
from trl_u2a.core.auto_budget import AUTO_BUDGET_FLOOR, auto_budget_count, otsu_threshold


def test_otsu_threshold_splits_two_groups_at_the_upper_one():
    scores = torch.tensor([5.1, 0.0, 0.2, 5.0, 0.1, 5.2])
    assert otsu_threshold(scores) == pytest.approx(5.0)
    # A long flat tail of small scores and a few large ones: the cut still falls before the large ones
    scores = torch.cat([torch.linspace(-1.0, 1.0, 50), torch.tensor([9.0, 10.0, 11.0])])
    assert otsu_threshold(scores) == pytest.approx(9.0)
    assert otsu_threshold(torch.tensor([2.0, 2.0, 2.0])) == 2.0
    with pytest.raises(ValueError, match="at least 2 scores, got 1"):
        otsu_threshold(torch.tensor([1.0]))


def test_auto_budget_counts_positive_scores_above_the_threshold_within_the_cap():
    scores = torch.tensor([-3.0, -2.9, -3.1, 1.0, 1.1])
    assert auto_budget_count(scores, cap=5) == 2  # the upper group
    assert auto_budget_count(scores, cap=1) == 1  # the numeric budget caps it
    # The upper group holds only negative scores: none is selectable, the count stays at least 1
    assert auto_budget_count(torch.tensor([-5.0, -4.9, -0.1, -0.2]), cap=4) == 1
    # The same data at two base rates: the count follows how many scores stand out, a fixed fraction does not
    few = torch.cat([torch.full((15,), 10.0), torch.zeros(85)])
    many = torch.cat([torch.full((50,), 10.0), torch.zeros(50)])
    assert (auto_budget_count(few, cap=100), auto_budget_count(many, cap=100)) == (15, 50)


def test_auto_budget_never_falls_below_its_floor_on_a_heavy_tail():
    # One outlier among 199 scores spread over [1, 3]: Otsu's cut isolates the outlier alone
    scores = torch.cat([torch.tensor([500.0]), torch.linspace(1.0, 3.0, 199)])
    assert otsu_threshold(scores) == 500.0
    floor = math.ceil(AUTO_BUDGET_FLOOR * 200)
    assert floor == 10 and auto_budget_count(scores, cap=50) == floor
    # The floor yields to the cap
    assert auto_budget_count(scores, cap=4) == 4
    # A group above the floor is kept as found
    scores = torch.cat([torch.full((30,), 9.0), torch.linspace(-1.0, 1.0, 170)])
    assert auto_budget_count(scores, cap=50) == 30


def test_the_initial_pass_sets_the_budget_and_keeps_it(tiny_model_path, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    unpaired = u2a_data.to_unpaired(Dataset.from_dict({"prompt": PROMPTS + PROMPTS, "completion": REJECTED + CHOSEN}))
    negatives = u2a_data.tokenize_unpaired(unpaired, tokenizer, 64, "negatives")
    negatives = [negatives[i] for i in range(len(negatives))]
    pairs = tokenized_pairs(tokenizer)
    args = _args(tmp_path, budget=1.0, auto_budget=True)
    host = LoopHost(model, negatives, tokenizer.pad_token_id, args)
    controller = loop_controller(host, pairs, tokenizer)
    record = controller.begin(step=0, max_steps=200)

    rows = [json.loads(line) for line in (tmp_path / "u2a_trace.jsonl").read_text().splitlines()]
    scores = torch.tensor([row["score"] for row in sorted(rows, key=lambda r: r["example_id"])])
    expected = auto_budget_count(scores, cap=len(negatives))
    assert record["budget"] == expected == controller.budget and record["n_selected"] <= expected
    assert int((host.weight_state.weights > 0).sum()) == record["n_selected"]
    # Later refreshes and a resumed run keep the budget the initial pass found, not the cap
    state = controller.state_dict()
    host.budget = len(negatives)
    fresh = loop_controller(host, pairs, tokenizer)
    fresh.load_state_dict(state)
    assert fresh.budget == expected


def test_the_model_card_names_the_budget_the_initial_pass_found():
    from types import SimpleNamespace

    from trl_u2a.model_card import _budget

    def trainer(found):
        controller = SimpleNamespace(auto_budget=found)
        return SimpleNamespace(budget=234, refresh_callback=SimpleNamespace(controller=controller))

    assert _budget(trainer(37)) == "37, set by auto_budget; cap 234"
    assert _budget(trainer(None)) == "234"
    assert _budget(SimpleNamespace(budget=59, refresh_callback=None)) == "59"  # no alignment set: no controller


def test_the_package_default_sets_the_budget_from_the_initial_pass(tiny_model_path, tmp_path, caplog):
    """No `auto_budget` given: the initial pass's count, capped by `budget`, is what the run selects, and the log
    says so (a user who set a count sees why fewer are selected)."""
    from conftest import cpu_args

    from trl_u2a import U2ATrainer

    negatives = Dataset.from_dict({"prompt": PROMPTS + PROMPTS, "completion": REJECTED + CHOSEN})
    alignment = Dataset.from_dict({"prompt": PROMPTS, "chosen": CHOSEN, "rejected": REJECTED})
    args = cpu_args(tmp_path, loss_type="ga", budget=1.0, max_steps=2, reweight_steps=1)
    trainer = U2ATrainer(model=tiny_model_path, args=args, train_dataset=negatives, alignment_dataset=alignment)
    with caplog.at_level(logging.INFO, logger="trl_u2a"):
        trainer.train()
    first = trainer.refresh_callback.history[0]
    rows = [json.loads(line) for line in (tmp_path / "u2a_trace.jsonl").read_text().splitlines()]
    scores = torch.tensor(
        [r["score"] for r in sorted((r for r in rows if r["refresh"] == 0), key=lambda r: r["example_id"])]
    )
    assert (
        first["budget"] == auto_budget_count(scores, cap=len(negatives)) == trainer.refresh_callback.controller.budget
    )
    assert first["n_selected"] <= first["budget"] < len(negatives)
    said = f"the initial pass sets the budget to {first['budget']} of {len(negatives)} negatives"
    assert sum(said in message for message in caplog.messages) == 1
