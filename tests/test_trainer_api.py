"""U2ATrainer as a drop-in Trainer: predict() and evaluate() on raw datasets, the MoE router loss, padding to a
multiple, and the refusal of streaming datasets."""

import math

import pytest
import torch
from conftest import CHOSEN, PROMPTS, REJECTED, cpu_args
from datasets import Dataset, IterableDataset

from trl_u2a import U2ATrainer
from trl_u2a.data import UnpairedCollator


def _completion_logp(model, prompt_ids, completion_ids):
    """log π(y|x) of one unpadded row, summed token by token: the hand reference."""
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logp = model(input_ids=ids).logits[0].float().log_softmax(-1)
    return sum(logp[t - 1, ids[0, t]].item() for t in range(len(prompt_ids), ids.size(1)))


@pytest.mark.parametrize("loss_type", ["ga", "npo"])
def test_predict_on_a_raw_dataset(tiny_model_path, tmp_path, preference_dataset, loss_type):
    trainer = U2ATrainer(
        model=tiny_model_path, args=cpu_args(tmp_path, loss_type=loss_type), train_dataset=preference_dataset
    )
    test = Dataset.from_dict({"prompt": PROMPTS[:3], "completion": REJECTED[:3], "label": [False, True, False]})
    out = trainer.predict(test)
    assert out.predictions.shape == (3,)
    assert out.label_ids.tolist() == [0, 1, 0]
    assert math.isfinite(out.metrics["test_loss"])
    prepared = trainer._prepare_dataset(test, trainer.processing_class, trainer.args, "test")
    expected = [_completion_logp(trainer.model, r["prompt_ids"], r["completion_ids"]) for r in prepared]
    assert out.predictions.tolist() == pytest.approx(expected, abs=1e-4)


def test_evaluate_on_raw_datasets(tiny_model_path, tmp_path, preference_dataset):
    """NPO's loss reads reference log-probs: a dataset passed to evaluate() gets them as the constructor's do."""
    trainer = U2ATrainer(
        model=tiny_model_path,
        args=cpu_args(tmp_path, loss_type="npo", per_device_eval_batch_size=4),
        train_dataset=preference_dataset,
        eval_dataset=preference_dataset,
    )
    at_construction = trainer.evaluate()["eval_loss"]
    assert trainer.evaluate(preference_dataset)["eval_loss"] == pytest.approx(at_construction)
    # at the start model π = π_0, so NPO's loss is (2/β) log 2 on every negative
    assert at_construction == pytest.approx(2 / trainer.args.beta * math.log(2), rel=1e-4)
    metrics = trainer.evaluate({"a": preference_dataset, "b": preference_dataset.select(range(2))})
    assert metrics["eval_a_loss"] == pytest.approx(at_construction)
    assert math.isfinite(metrics["eval_b_loss"])


def _tiny_mixtral(tokenizer, router_aux_loss_coef=0.02):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    config = MixtralConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        router_aux_loss_coef=router_aux_loss_coef,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    return MixtralForCausalLM(config)


def test_moe_router_loss_is_added_as_kto_adds_it(tokenizer, tmp_path, preference_dataset):
    losses = {}
    for coef in (0.0, 10.0):
        model = _tiny_mixtral(tokenizer)
        trainer = U2ATrainer(
            model=model,
            args=cpu_args(tmp_path, router_aux_loss_coef=coef),
            train_dataset=preference_dataset,
            processing_class=tokenizer,
        )
        assert trainer.aux_loss_enabled == (coef != 0)
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
        model.train()
        losses[coef] = trainer.compute_loss(model, batch).item()
    with torch.no_grad():
        aux = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_router_logits=True
        ).aux_loss.item()
    assert aux > 0
    assert losses[10.0] - losses[0.0] == pytest.approx(10.0 * aux, rel=1e-4)
    assert trainer._metrics["train"]["aux_loss"] == [pytest.approx(aux, rel=1e-4)]


def test_moe_turns_in_training_scores_off(tokenizer, tmp_path, preference_dataset):
    """The load-balancing loss couples the rows of a batch, so the scores are taken in a separate pass without it."""
    trainer = U2ATrainer(
        model=_tiny_mixtral(tokenizer),
        args=cpu_args(tmp_path),
        train_dataset=preference_dataset,
        processing_class=tokenizer,
        alignment_dataset=Dataset.from_dict({"prompt": PROMPTS, "chosen": CHOSEN, "rejected": REJECTED}),
    )
    assert trainer.aux_loss_enabled  # the architecture's own coefficient, as KTO reads it
    assert trainer.refresh_callback.controller.in_training is False


def test_pad_to_multiple_of(tiny_model_path, tmp_path, preference_dataset):
    trainer = U2ATrainer(
        model=tiny_model_path, args=cpu_args(tmp_path, pad_to_multiple_of=16), train_dataset=preference_dataset
    )
    rows = [trainer.train_dataset[i] for i in range(4)]
    batch = trainer.data_collator(rows)
    unpadded = UnpairedCollator(trainer.processing_class.pad_token_id, None)(rows)
    assert batch["input_ids"].size(1) % 16 == 0 and batch["input_ids"].size(1) < unpadded["input_ids"].size(1) + 16
    width = unpadded["input_ids"].size(1)
    assert torch.equal(batch["input_ids"][:, :width], unpadded["input_ids"])
    assert not batch["attention_mask"][:, width:].any() and not batch["completion_mask"][:, width:].any()


def _stream(dataset):
    return IterableDataset.from_generator(lambda: (yield from dataset))


def test_streaming_datasets_are_refused_with_the_fix(tiny_model_path, tmp_path, preference_dataset):
    expected = r"train_dataset is a streaming IterableDataset; U2A needs a datasets.Dataset .*Dataset.from_generator"
    with pytest.raises(ValueError, match=expected):
        U2ATrainer(model=tiny_model_path, args=cpu_args(tmp_path), train_dataset=_stream(preference_dataset))
    with pytest.raises(ValueError, match=r"eval_dataset is a streaming IterableDataset.*\.take\(n\)"):
        U2ATrainer(
            model=tiny_model_path,
            args=cpu_args(tmp_path),
            train_dataset=preference_dataset,
            eval_dataset=_stream(preference_dataset),
        )
    with pytest.raises(ValueError, match=r"alignment_dataset is a streaming IterableDataset"):
        U2ATrainer(
            model=tiny_model_path,
            args=cpu_args(tmp_path),
            train_dataset=preference_dataset,
            alignment_dataset=_stream(preference_dataset),
        )


def test_construction_hashes_no_model(tiny_model_path, tmp_path, preference_dataset, monkeypatch):
    """KTO's cache key (a SHA-256 of every parameter) is never computed, and no reference model is loaded: U2A's
    NPO reference log-probs come from the start model, in memory."""
    from trl.trainer import kto_trainer

    def hash_module(module):
        raise AssertionError("the model was hashed")

    monkeypatch.setattr(kto_trainer, "hash_module", hash_module)
    trainer = U2ATrainer(
        model=tiny_model_path, args=cpu_args(tmp_path, loss_type="npo"), train_dataset=preference_dataset
    )
    assert kto_trainer.hash_module is hash_module  # restored after construction
    assert trainer.ref_model is None
    assert "ref_logps" in trainer.train_dataset.column_names
