"""Every scoring pass builds its batches one at a time: the initial pass, the retain sample, the pairs' reference pass
and `score_negatives` hold at most two batches at once (the one being scored and the next being built), whatever
the number of negatives, and give bitwise the results of building every batch first (reference implementations
below, the code before streaming)."""

from __future__ import annotations

import math
import weakref

import pytest
import torch
from conftest import CHOSEN, PROMPTS, REJECTED, cpu_args
from datasets import Dataset

from trl_u2a import U2ATrainer, scoring
from trl_u2a import data as u2a_data
from trl_u2a.core.modeling import fill_reference_logps, model_device, move_batch, sequence_logps
from trl_u2a.core.objectives import DPOObjective, reference_logps
from trl_u2a.influence import compute_query, make_unlearning_loss_fn, score_dataset, scoring_mode

# At most the batch in use and the next one being built
MAX_ALIVE = 2


class BatchCounter:
    """Wraps a collator: counts the batches it built and how many of them were alive (not yet freed) at most."""

    def __init__(self, collate):
        self.collate = collate
        self.built = self.alive = self.max_alive = 0

    def __call__(self, examples):
        batch = self.collate(examples)
        self.built += 1
        self.alive += 1
        self.max_alive = max(self.max_alive, self.alive)
        # `move_batch` to the CPU keeps the tensor: it dies with the last batch dict that holds it
        weakref.finalize(batch["input_ids" if "input_ids" in batch else "chosen_input_ids"], self._freed)
        return batch

    def _freed(self):
        self.alive -= 1

    def reset(self):
        self.built = self.max_alive = 0


@pytest.fixture
def trainer(tiny_model_path, tmp_path):
    """24 negatives and 6 retain rows, scored and collated 2 rows at a time: 12 batches of negatives."""
    negatives = Dataset.from_dict(
        {
            "prompt": PROMPTS * 5,
            "completion": (REJECTED + CHOSEN) * 2 + CHOSEN,
            "label": [False] * 24 + [True] * 6,
        }
    )
    alignment = Dataset.from_dict({"prompt": PROMPTS, "chosen": CHOSEN, "rejected": REJECTED})
    args = cpu_args(tmp_path, loss_type="npo", budget=6, scoring_batch_size=2, retain_nll_tolerance=1.0)
    trainer = U2ATrainer(model=tiny_model_path, args=args, train_dataset=negatives, alignment_dataset=alignment)
    trainer.data_collator = BatchCounter(trainer.data_collator)
    return trainer


def listed_batches(trainer, rows, batch_size, device):
    """The host's batches as they were built before streaming: all of them, collated and moved, in a list."""
    dataset, collator = trainer.train_dataset, trainer.data_collator
    rows = rows.tolist()
    batches = []
    for start in range(0, len(rows), batch_size):
        columns = dataset[rows[start : start + batch_size]]
        examples = [dict(zip(columns, values)) for values in zip(*columns.values())]
        batches.append(move_batch(collator(examples), device))
    return batches


def test_the_initial_pass_streams_its_negatives_and_scores_them_as_before(trainer):
    controller = trainer.refresh_callback.controller
    counter, model = trainer.data_collator, controller.host.policy()
    with scoring_mode(model):
        controller.ref_pair_logps = controller._reference_pair_logps(model)
        query = compute_query(model, controller.objective, controller._pair_batches(model, None, len(controller.pairs)))
        candidates = torch.arange(24)
        counter.reset()
        streamed = controller._score(model, query, candidates)
        assert counter.built == 12 and counter.max_alive <= MAX_ALIVE

        counter.reset()
        batches = listed_batches(trainer, trainer.negative_rows[candidates], 2, torch.device("cpu"))
        listed = score_dataset(model, batches, controller.loss_fn, query, disable_progress=True)
        # The check itself sees the difference: a list holds every batch
        assert counter.max_alive == 12
    assert torch.equal(streamed, listed)


def test_the_retain_sample_streams_and_its_nll_is_unchanged(trainer):
    controller = trainer.refresh_callback.controller
    counter, model = trainer.data_collator, controller.host.policy()
    counter.reset()
    streamed = controller._retain_nll(model)
    assert counter.built == 3 and counter.max_alive <= MAX_ALIVE

    total, count = torch.zeros((), dtype=torch.float64), 0
    with torch.no_grad():
        for batch in listed_batches(trainer, trainer.retain_rows, 2, model_device(model)):
            inputs = (batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
            logps, lengths = sequence_logps(model, *inputs)
            total += (-logps / lengths.clamp(min=1)).sum().double()
            count += len(logps)
    assert streamed == float(total / count)


def test_the_pairs_reference_pass_streams_and_equals_the_listed_one(trainer):
    controller = trainer.refresh_callback.controller
    model = controller.host.policy()
    counter = BatchCounter(controller.pair_collator)
    controller.pair_collator = counter
    with scoring_mode(model):
        streamed = controller._reference_pair_logps(model)
        assert counter.built == 3 and counter.max_alive <= MAX_ALIVE
        filled = reference_logps(model, list(controller._pair_batches(model, None, len(controller.pairs))))
    listed = torch.cat([torch.stack([b["ref_chosen_logps"], b["ref_rejected_logps"]], dim=1) for b in filled])
    assert torch.equal(streamed, listed.float())


def listed_score_negatives(model, tokenizer, negatives, alignment, loss_type, batch_size):
    """`score_negatives` before streaming (default objective and preconditioner): every batch built first."""
    rows = u2a_data.tokenize_unpaired(u2a_data.to_unpaired(negatives, "negatives"), tokenizer, 64, "negatives")
    pairs = u2a_data.tokenize_pairs(alignment, tokenizer, 64, "alignment_set")
    collate = u2a_data.UnpairedCollator(tokenizer.pad_token_id, 64)
    collate_pairs = u2a_data.PairCollator(tokenizer.pad_token_id, 64)
    pair_batches = [
        collate_pairs([pairs[i] for i in range(s, min(s + batch_size, len(pairs)))])
        for s in range(0, len(pairs), batch_size)
    ]
    negative_batches = [
        collate([rows[i] for i in range(s, min(s + batch_size, len(rows)))]) for s in range(0, len(rows), batch_size)
    ]
    with scoring_mode(model):
        pair_batches = reference_logps(model, pair_batches)
        if loss_type == "npo":
            negative_batches = fill_reference_logps(model, negative_batches)
        query = compute_query(model, DPOObjective(0.1), pair_batches)
        loss_fn = make_unlearning_loss_fn(loss_type, None, 0.0, "mean")
        return score_dataset(model, negative_batches, loss_fn, query, disable_progress=True)


@pytest.mark.parametrize("loss_type", ["npo", "ga"])
def test_score_negatives_streams_and_scores_as_before(tiny_model_path, tokenizer, monkeypatch, loss_type):
    from transformers import AutoModelForCausalLM

    counters = []

    def counting(collator_class):
        def make(*args, **kwargs):
            counters.append(BatchCounter(collator_class(*args, **kwargs)))
            return counters[-1]

        return make

    monkeypatch.setattr(scoring.u2a_data, "UnpairedCollator", counting(u2a_data.UnpairedCollator))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    negatives = Dataset.from_dict({"prompt": PROMPTS * 4, "completion": (REJECTED + CHOSEN) * 2})
    alignment = Dataset.from_dict({"prompt": PROMPTS, "chosen": CHOSEN, "rejected": REJECTED})
    scored = scoring.score_negatives(model, tokenizer, negatives, alignment, loss_type=loss_type, batch_size=2)
    (counter,) = counters
    # NPO's reference log-probs are a pass of their own over the 12 batches
    assert counter.built == (24 if loss_type == "npo" else 12) and counter.max_alive <= MAX_ALIVE
    listed = listed_score_negatives(model, tokenizer, negatives, alignment, loss_type, batch_size=2)
    assert torch.equal(torch.tensor(scored["score"], dtype=torch.float32), listed)


def listed_trace_rows(record, scores: dict, weights: list, names):
    """The trace rows as `TraceWriter.write_rows` built them before streaming: every row dict in one list."""
    rows = []
    for i in sorted(set(scores) | {i for i, w in enumerate(weights) if w > 0}):
        row = {"refresh": record["refresh"], "step": record["step"], "example_id": i, "score": scores.get(i)}
        row["weight"] = weights[i]
        if names is not None:
            row["id"] = names[i]
        rows.append(row)
    return rows


@pytest.mark.parametrize("with_names", [False, True])
def test_trace_rows_are_written_in_chunks_as_before(tmp_path, monkeypatch, with_names):
    import json

    from trl_u2a.refresh import record as record_module

    monkeypatch.setattr(record_module, "TRACE_CHUNK", 7)  # several chunks, the last one partial
    generator = torch.Generator().manual_seed(0)
    n = 40
    weights = torch.rand(n, generator=generator, dtype=torch.float64) * (torch.rand(n, generator=generator) > 0.6)
    # Candidates in the controller's order (not sorted), a non-finite score among them; selected ones not all scored
    ids = torch.randperm(n, generator=generator)[:17]
    scores = torch.randn(17, generator=generator, dtype=torch.float64)
    scores[3] = math.nan
    names = [f"row-{i}" for i in range(n)] if with_names else None
    record = {"refresh": 2, "step": 30}
    record_module.TraceWriter(str(tmp_path)).write_rows(record, ids, scores, weights, names)

    expected = listed_trace_rows(record, dict(zip(ids.tolist(), scores.tolist())), weights.tolist(), names)
    lines = (tmp_path / record_module.TRACE_FILE).read_text().splitlines()
    assert lines == [json.dumps(row) for row in expected]
    assert len(lines) > 2 * 7


def test_growing_tensor_equals_the_concatenation_across_growths():
    from trl_u2a.core.modeling import GrowingTensor

    assert torch.equal(GrowingTensor().values(), torch.zeros(0))
    generator = torch.Generator().manual_seed(0)
    parts = [torch.randn(int(size), generator=generator) for size in torch.randint(0, 700, (12,), generator=generator)]
    grown = GrowingTensor()
    for part in parts:
        grown.extend(part)
    values = grown.values()
    assert torch.equal(values, torch.cat(parts)) and len(grown.buffer) > 1024  # it grew past its first buffer
    # A copy: later appends do not change what was returned
    grown.extend(torch.ones(3))
    assert torch.equal(values, torch.cat(parts))
