"""In-training scores under the backward's loss scaling: with gradient accumulation, and with a loss scale applied
before the backward (as AMP's GradScaler and DeepSpeed fp16 apply one), the scores the training backward records equal
brute-force per-example `torch.autograd.grad` scores computed here, independently of the package."""

import pytest
import torch
from conftest import CHOSEN, PROMPTS, REJECTED, cpu_args
from datasets import Dataset

from trl_u2a import U2ATrainer


def _ga_loss(model, row, collator):
    """`ℓ = log π(y|x) / |y|` of one row: a plain forward, log-softmax and gather."""
    batch = collator([row])
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logps = torch.gather(logits[:, :-1].log_softmax(-1), 2, batch["input_ids"][:, 1:, None]).squeeze(-1)
    mask = batch["completion_mask"][:, 1:].to(logps.dtype)
    return (logps * mask).sum() / mask.sum()


@pytest.fixture(params=[1.0, 1024.0], ids=["unscaled", "loss scale 1024"])
def trained(tiny_model_path, tmp_path, request):
    """Two optimizer steps of two accumulated micro-batches each, at lr 0 (the model, hence the query, stays put),
    with a refresh after every step and non-uniform weights after the first; the backward multiplies the loss by
    `request.param` on top of transformers' 1 / accumulation steps."""
    from peft import LoraConfig

    negatives = Dataset.from_dict({"prompt": PROMPTS + PROMPTS, "completion": REJECTED + CHOSEN})
    alignment = Dataset.from_dict({"prompt": PROMPTS, "chosen": CHOSEN, "rejected": REJECTED})
    args = cpu_args(
        tmp_path,
        loss_type="ga",
        budget=8,
        reweight_steps=1,
        max_steps=2,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        learning_rate=0.0,
        preconditioner="identity",
        pa_samples=len(PROMPTS),  # every refresh's query from all pairs: the same v at lr 0
        weight_lr=0.5,
    )
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM", init_lora_weights=False)
    trainer = U2ATrainer(
        model=tiny_model_path, args=args, train_dataset=negatives, alignment_dataset=alignment, peft_config=lora
    )
    backward = trainer.accelerator.backward
    trainer.accelerator.backward = lambda loss, **kwargs: backward(loss * request.param, **kwargs)
    trainer.train()
    return trainer


def test_in_training_scores_with_gradient_accumulation_equal_brute_force(trained):
    controller = trained.refresh_callback.controller
    second = controller.history[1]
    assert second["num_scored_in_training"] >= 2
    weights = torch.tensor(controller.history[0]["weights"])
    assert len(set(weights[weights > 0].tolist())) > 1  # the coefficients differ from row to row
    query = controller.query
    params = list(query)
    model = trained.model.eval()
    # Every score of the second refresh: the in-training ones and the pool's, all taken with the same v
    for negative_id, score in second["last_scores"].items():
        row = trained.train_dataset[int(trained.negative_rows[negative_id])]
        grads = torch.autograd.grad(_ga_loss(model, row, trained._collator), params, allow_unused=True)
        expected = sum(float((g * query[p]).sum()) for p, g in zip(params, grads) if g is not None)
        assert score == pytest.approx(expected, rel=1e-4, abs=1e-6)
