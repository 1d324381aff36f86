"""The refresh controller outside any Trainer: a plain training loop that implements `RefreshHost` drives it, and
its selection equals the one `score_negatives`-style brute force gives."""

from __future__ import annotations

import types

import pytest
import torch
from conftest import CHOSEN, PROMPTS, REJECTED
from datasets import Dataset
from torch import nn

from trl_u2a import data as u2a_data
from trl_u2a.core.objectives import DPOObjective
from trl_u2a.core.weighting import WeightState, budget_size
from trl_u2a.refresh import RefreshController
from trl_u2a.refresh.sharding import Sharding


class OneProcess:
    """The accelerator part a refresh uses, for one process."""

    process_index, num_processes, is_main_process, device = 0, 1, True, torch.device("cpu")

    def gather(self, tensor):
        return tensor

    def reduce(self, tensor, reduction="sum"):
        return tensor


class LoopHost:
    """A minimal `RefreshHost` over a model, an optimizer and tokenized negatives: no transformers Trainer."""

    def __init__(self, model, negatives, pad_token_id, args):
        self.model, self.negatives, self.args = model, negatives, args
        self.sharding = Sharding(OneProcess())
        self.weight_state = WeightState.from_initial(torch.ones(len(negatives), dtype=torch.float64))
        self.budget = budget_size(args.budget, len(negatives))
        self.negative_names = None
        self.num_retain = 0
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        self.is_sharded = False
        self.collator = u2a_data.UnpairedCollator(pad_token_id, args.max_length)
        self.logged = []

    def policy(self):
        return self.model

    def set_weights(self, state):
        self.weight_state = state

    def negative_batches(self, ids, batch_size, device):
        rows = [self.negatives[i] for i in ids]
        return [self.collator(rows[s : s + batch_size]) for s in range(0, len(rows), batch_size)]

    def retain_batches(self, positions, batch_size, device):
        return []

    def reference(self):
        return None, None

    def learning_rate(self):
        return 1e-3

    def log_metrics(self, metrics):
        self.logged.append(metrics)


def _logps(model, batch, prefix=""):
    """`log π(y|x)` of each row of a collated batch: a plain forward, log-softmax, gather, completion mask."""
    ids = batch[f"{prefix}input_ids"]
    logits = model(input_ids=ids, attention_mask=batch[f"{prefix}attention_mask"]).logits
    per_token = torch.gather(logits[:, :-1].log_softmax(-1), 2, ids[:, 1:, None]).squeeze(-1)
    return (per_token * batch[f"{prefix}completion_mask"][:, 1:]).sum(-1)


def tokenized_pairs(tokenizer) -> list[dict]:
    """The conftest alignment pairs, tokenized (max_length 64) as a list of rows."""
    pairs = u2a_data.tokenize_pairs(
        Dataset.from_dict({"prompt": PROMPTS, "chosen": CHOSEN, "rejected": REJECTED}), tokenizer, 64, "pairs"
    )
    return [pairs[i] for i in range(len(pairs))]


def loop_controller(host, pairs, tokenizer, in_training=False) -> RefreshController:
    """A controller over `host` with the DPO objective (β 0.1) on `pairs`, 4 rows per optimizer step."""
    return RefreshController(
        host,
        pairs,
        u2a_data.PairCollator(tokenizer.pad_token_id, 64),
        DPOObjective(0.1),
        in_training=in_training,
        rows_per_step=4,
    )


def _args(tmp_path, **overrides):
    values = dict(
        budget=0.5, pa_samples=None, pool_size=None, reweight_steps=None, reweight_overhead=0.15,
        reweight_warmup_steps=0, loss_type="ga", beta=0.1, gamma=0.0, beta_pa=0.1, scoring_batch_size=None,
        per_device_train_batch_size=4, max_length=64, output_dir=str(tmp_path), patience=0,
        retain_nll_tolerance=None, seed=0, preconditioner="identity", preconditioner_batches=0, damping=0.0,
        weight_lr=0.2, score_clip=2.0, max_weight=4.0, sparsity=0.0, disable_tqdm=True, auto_budget=False,
    )  # fmt: skip
    values.update(overrides)
    return types.SimpleNamespace(**values)


def test_a_plain_loop_drives_the_initial_pass_and_its_selection_is_the_brute_force_one(
    tiny_model_path, tokenizer, tmp_path
):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    negatives = u2a_data.tokenize_unpaired(
        u2a_data.to_unpaired(Dataset.from_dict({"prompt": PROMPTS + PROMPTS, "completion": REJECTED + CHOSEN})),
        tokenizer,
        64,
        "negatives",
    )
    negatives = [negatives[i] for i in range(len(negatives))]
    pairs = tokenized_pairs(tokenizer)
    args = _args(tmp_path)
    host = LoopHost(model, negatives, tokenizer.pad_token_id, args)
    controller = loop_controller(host, pairs, tokenizer)
    record = controller.begin(step=0, max_steps=200)

    assert record is not None and record["refresh"] == 0 and record["num_scored"] == len(negatives)
    assert host.logged and host.logged[0]["u2a/objective"] == record["objective"]
    # The selection is the top-budget positive scores under brute force written out here: v = ∇J of the mean DPO
    # loss (the start model is its own reference at step 0), s_i = ⟨v, ∇ℓ_i⟩ with ℓ_i the token-mean log-prob
    params = list({id(p): p for m in model.modules() if isinstance(m, (nn.Linear, nn.Embedding))
                   for p in m.parameters() if p.requires_grad}.values())  # fmt: skip
    model.eval()
    batch = u2a_data.PairCollator(tokenizer.pad_token_id, 64)([pairs[i] for i in range(len(pairs))])
    chosen, rejected = _logps(model, batch, "chosen_"), _logps(model, batch, "rejected_")
    margin = (chosen - chosen.detach()) - (rejected - rejected.detach())
    objective = -torch.nn.functional.logsigmoid(0.1 * margin).mean()
    v = torch.autograd.grad(objective, params)
    scores = []
    for row in negatives:
        one = host.collator([row])
        logps = _logps(model, one)
        ell = logps / one["completion_mask"][:, 1:].sum()
        scores.append(sum(float((g * vi).sum()) for g, vi in zip(torch.autograd.grad(ell.sum(), params), v)))
    scores = torch.tensor(scores)
    positive = [i for i in scores.argsort(descending=True).tolist() if scores[i] > 0][: host.budget]
    selected = torch.nonzero(host.weight_state.weights > 0).flatten().tolist()
    assert len(positive) == host.budget and sorted(selected) == sorted(positive)
    assert record["objective"] == pytest.approx(objective.item(), rel=1e-6)
    # The scores themselves, as the trace reports them
    assert torch.tensor([record["last_scores"][i] for i in range(len(negatives))]).tolist() == pytest.approx(
        scores.tolist(), rel=1e-4, abs=1e-6
    )
    # The plan: refreshes after the initial pass, inside the 200 steps, none at the last one
    assert controller.schedule and max(controller.schedule) < 200
    # Files: one refresh record and one trace row per scored negative
    lines = (tmp_path / "u2a_refreshes.jsonl").read_text().splitlines()
    assert len(lines) == 1 and '"weights"' not in lines[0]
    assert len((tmp_path / "u2a_trace.jsonl").read_text().splitlines()) == len(negatives)
