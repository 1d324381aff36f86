"""U2ATrainer: losses on real batches, weighted gradients, sampling, formats, PEFT/QLoRA, validation."""

import math

import pytest
import torch
from conftest import CHOSEN, PROMPTS, REJECTED, cpu_args
from datasets import Dataset
from trl import KTOTrainer

from trl_u2a import U2AConfig, U2ATrainer
from trl_u2a.data import NEGATIVE_ID


def _trainer(path, tmp_path, dataset, **overrides):
    return U2ATrainer(model=path, args=cpu_args(tmp_path, **overrides), train_dataset=dataset)


def _single_logp(model, tokenizer, prompt, completion):
    """log π(y|x) of one unpadded example, summed token by token: the hand reference."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    full = tokenizer(prompt + completion + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([full])
    logits = model(input_ids=ids).logits[0].float()
    logp = logits.log_softmax(-1)
    total = sum(logp[t - 1, full[t]] for t in range(len(prompt_ids), len(full)))
    return total, len(full) - len(prompt_ids)


def _batch(trainer, rows):
    return trainer.data_collator([trainer.train_dataset[i] for i in rows])


@pytest.mark.parametrize("loss_type", ["ga", "npo", "simnpo", "graddiff"])
def test_compute_loss_equals_hand_reference(tiny_model_path, tokenizer, tmp_path, preference_dataset, loss_type):
    trainer = _trainer(tiny_model_path, tmp_path, preference_dataset, loss_type=loss_type, gamma=0.3)
    state = trainer.weight_state
    weights = torch.tensor([0.5, 2.0, 1.0, 3.0, 0.0, 1.5], dtype=torch.float64)
    trainer.set_weights(type(state).from_initial(weights))
    rows = list(range(len(trainer.train_dataset)))  # negatives and retain rows, mixed lengths
    batch = _batch(trainer, rows)
    model = trainer.model.train()  # in eval mode the loss is unweighted (eval rows are not training negatives)
    # The policy moves away from the start model, so that NPO's reference term is not the policy's own log-prob
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=generator))
    loss = trainer.compute_loss(model, batch)
    # log π_0 from the start model loaded on its own, not the trainer's cached `ref_logps` column
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(tiny_model_path)

    args = trainer.args
    num, den, retain = 0.0, 0.0, []
    for r in rows:
        row = trainer.train_dataset[r]
        lp, n = _single_logp(model, tokenizer, row["prompt"], row["completion"])
        if row["label"]:
            retain.append(-lp / n)
            continue
        w = weights[row[NEGATIVE_ID]].item()
        if loss_type in ("ga", "graddiff"):
            ell = lp / n
        elif loss_type == "npo":
            with torch.no_grad():
                ref_lp, _ = _single_logp(reference, tokenizer, row["prompt"], row["completion"])
            assert abs(lp - ref_lp) > 1e-3  # the two terms differ: the oracle sees a wrong reference
            ell = 2 / args.beta * torch.log1p(torch.exp(args.beta * (lp - ref_lp)))
        else:
            ell = -2 / args.beta * torch.nn.functional.logsigmoid(-(args.beta / n) * lp - args.gamma)
        num, den = num + w * ell, den + w
    expected = num / den
    if loss_type == "graddiff":
        expected = expected + args.retain_weight * sum(retain) / len(retain)
    # abs: graddiff subtracts two terms of size ~6, so float32 rounding of each shows in the difference
    assert loss.item() == pytest.approx(float(expected), rel=1e-5, abs=1e-5)


def test_gradient_is_weighted_combination_of_per_example_gradients(tiny_model_path, tmp_path, preference_dataset):
    trainer = _trainer(tiny_model_path, tmp_path, preference_dataset, loss_type="ga")
    weights = torch.tensor([1.0, 0.0, 2.0, 0.5, 1.0, 3.0], dtype=torch.float64)
    trainer.set_weights(type(trainer.weight_state).from_initial(weights))
    negative_rows = [i for i in range(len(trainer.train_dataset)) if not trainer.train_dataset[i]["label"]]
    params = [p for p in trainer.model.train().parameters() if p.requires_grad]

    grads = torch.autograd.grad(trainer.compute_loss(trainer.model, _batch(trainer, negative_rows)), params)
    expected = [torch.zeros_like(p) for p in params]
    for r in negative_rows:
        w = weights[trainer.train_dataset[r][NEGATIVE_ID]].item()
        trainer.set_weights(type(trainer.weight_state).from_initial(torch.ones(6, dtype=torch.float64)))
        g = torch.autograd.grad(trainer.compute_loss(trainer.model, _batch(trainer, [r])), params)
        for e, gi in zip(expected, g):
            e.add_(gi, alpha=w / weights.sum().item())
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)


def test_zero_weight_negatives_are_never_sampled(tiny_model_path, tmp_path, preference_dataset):
    weights = [1.0, 0.0, 1.0, 0.0, 2.0, 1.0]
    dataset = preference_dataset.add_column("weight", weights)
    trainer = _trainer(tiny_model_path, tmp_path, dataset, loss_type="ga", max_steps=10)
    seen = []
    for _ in range(3):
        for batch in trainer.get_train_dataloader():
            seen += batch[NEGATIVE_ID].tolist()
    assert seen and set(seen) == {0, 2, 4, 5}


@pytest.mark.parametrize("retain_weight", [0.0, 1.0])
def test_every_batch_is_full(tiny_model_path, tmp_path, unpaired_dataset, retain_weight):
    """5 active negatives at batch 4: an epoch of 5 draws ended on a batch of one; it is rounded up to whole batches
    and the draws cycle through the permutations of the active negatives (every one drawn once before any twice)."""
    weights = [1.0, 1.0, 1.0, 0.0, 1.0, 1.0] + [1.0] * 6
    dataset = unpaired_dataset.add_column("weight", weights)
    trainer = _trainer(tiny_model_path, tmp_path, dataset, loss_type="ga", max_steps=10, retain_weight=retain_weight)
    sizes, drawn = [], []
    for batch in trainer.get_train_dataloader():
        sizes.append(len(batch[NEGATIVE_ID]))
        drawn += [i for i in batch[NEGATIVE_ID].tolist() if i >= 0]
    assert sizes and all(size == 4 for size in sizes)
    assert sorted(drawn[:5]) == [0, 1, 2, 4, 5] and set(drawn) == {0, 1, 2, 4, 5}


def test_the_trainer_uses_the_one_budget_rule(tiny_model_path, tmp_path):
    """10 negatives at budget 0.25: 2.5 rounds half up to 3 (`weighting.budget_size`), on the trainer's path."""
    from trl_u2a.core.weighting import budget_size

    dataset = Dataset.from_dict({"prompt": PROMPTS + PROMPTS[:4], "completion": REJECTED + CHOSEN[:4]})
    alignment = Dataset.from_dict({"prompt": PROMPTS, "chosen": CHOSEN, "rejected": REJECTED})
    for budget, expected in ((0.25, 3), (1, 10), (1.0, 10), (2, 2)):
        trainer = U2ATrainer(
            model=tiny_model_path,
            args=cpu_args(tmp_path, budget=budget),
            train_dataset=dataset,
            alignment_dataset=alignment,
        )
        assert trainer.budget == budget_size(budget, 10) == expected


def test_resume_refuses_a_state_with_another_number_of_negatives(tiny_model_path, tmp_path, preference_dataset):
    from trl_u2a.core.weighting import WeightState

    trainer = _trainer(tiny_model_path, tmp_path, preference_dataset, loss_type="ga")
    with pytest.raises(ValueError, match="weights for 7 negatives but this run has 6"):
        trainer.load_u2a_state_dict({"weights": WeightState.uniform(7).state_dict()})


@pytest.mark.parametrize("loss_type", ["ga", "npo", "simnpo", "graddiff"])
def test_training_lowers_negative_logps(tiny_model_path, tokenizer, tmp_path, preference_dataset, loss_type):
    # SimNPO's default β=4.5 saturates on an untrained model (its loss is ~0); a smaller β keeps a gradient
    beta = 0.5 if loss_type == "simnpo" else None
    trainer = _trainer(
        tiny_model_path, tmp_path, preference_dataset, loss_type=loss_type, beta=beta, max_steps=6, learning_rate=5e-3
    )

    def mean_logp():
        with torch.no_grad():
            return sum(_single_logp(trainer.model, tokenizer, p, r)[0].item() for p, r in zip(PROMPTS, REJECTED))

    before = mean_logp()
    trainer.train()
    assert mean_logp() < before - 1.0


def test_conversational_preference_lora_save_and_reload(tiny_model_path, tmp_path, conversational_preference_dataset):
    from peft import AutoPeftModelForCausalLM, LoraConfig

    trainer = U2ATrainer(
        model=tiny_model_path,
        args=cpu_args(tmp_path, loss_type="npo", max_steps=2),
        train_dataset=conversational_preference_dataset,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    # The chat template was applied: prompts end with the generation prompt
    row = trainer.train_dataset[0]
    assert trainer.processing_class.decode(row["prompt_ids"]).endswith("<|im_start|>assistant\n")
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    changed = [n for n, p in trainer.model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert any("lora_B" in n for n in changed)
    trainer.save_model(str(tmp_path / "adapter"))
    reloaded = AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "adapter"))
    ids = torch.tensor([row["prompt_ids"] + row["completion_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, trainer.model(input_ids=ids).logits)


def test_qlora_4bit_runs_on_cpu(tiny_model_path, tmp_path, preference_dataset):
    from peft import LoraConfig
    from transformers import BitsAndBytesConfig

    trainer = U2ATrainer(
        model=tiny_model_path,
        args=cpu_args(tmp_path, loss_type="npo", max_steps=2),
        train_dataset=preference_dataset,
        quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
        ),
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    assert any("Linear4bit" in type(m).__name__ for m in trainer.model.modules())
    trainer.train()
    assert math.isfinite(trainer.state.log_history[-1]["train_loss"])


def test_eval_dataset_with_more_negatives_than_training_is_unweighted(tiny_model_path, tmp_path, preference_dataset):
    bigger = Dataset.from_dict({"prompt": PROMPTS * 3, "completion": REJECTED * 3})
    trainer = U2ATrainer(
        model=tiny_model_path,
        args=cpu_args(tmp_path, loss_type="npo", eval_strategy="steps", eval_steps=1, max_steps=2),
        train_dataset=preference_dataset,
        eval_dataset=bigger,
    )
    # NPO at the start model (its own reference) is exactly 2 ln 2 / β on every row, whatever the row's id
    before = trainer.evaluate()
    assert before["eval_loss"] == pytest.approx(2 * math.log(2) / trainer.args.beta, rel=1e-4)
    trainer.train()
    metrics = trainer.evaluate()
    assert math.isfinite(metrics["eval_loss"]) and "eval_loss/negatives" in metrics


def test_unpaired_and_negatives_only_formats(tiny_model_path, tmp_path, unpaired_dataset):
    trainer = _trainer(tiny_model_path, tmp_path, unpaired_dataset, loss_type="ga")
    assert trainer.num_negatives == 6
    negatives_only = Dataset.from_dict({"prompt": PROMPTS, "completion": REJECTED})
    trainer = _trainer(tiny_model_path, tmp_path, negatives_only, loss_type="simnpo")
    assert trainer.num_negatives == 6 and len(trainer.retain_rows) == 0
    before = [p.detach().clone() for p in trainer.model.parameters() if p.requires_grad]
    trainer.train()
    after = [p.detach() for p in trainer.model.parameters() if p.requires_grad]
    assert math.isfinite(trainer.state.log_history[-1]["train_loss"])
    assert any(not torch.equal(a, b) for a, b in zip(after, before)), "training on negatives only changed nothing"


@pytest.mark.parametrize(
    "dataset, overrides, match",
    [
        (Dataset.from_dict({"prompt": PROMPTS, "answer": CHOSEN}), {}, "expected one of"),
        (Dataset.from_dict({"prompt": PROMPTS, "completion": CHOSEN, "label": [True] * 6}), {}, "no negatives"),
        (Dataset.from_dict({"prompt": PROMPTS, "completion": CHOSEN, "label": [0, 1] * 3}), {}, "must hold booleans"),
        (Dataset.from_dict({"prompt": PROMPTS, "completion": REJECTED, "weight": [1, -1.0, 1, 1, 1, 1]}), {}, "row 1"),
        (
            Dataset.from_dict({"prompt": PROMPTS, "completion": REJECTED, "weight": [1, 1, float("nan"), 1, 1, 1]}),
            {},
            "row 2",
        ),
        (Dataset.from_dict({"prompt": PROMPTS, "completion": REJECTED}), {"max_length": 3}, "max_length=3"),
        (Dataset.from_dict({"prompt": [], "completion": []}), {}, "is empty"),
        (Dataset.from_dict({"prompt": PROMPTS, "completion": REJECTED}), {"retain_weight": 1.0}, "retain examples"),
    ],
)
def test_bad_input_raises_clear_errors(tiny_model_path, tmp_path, dataset, overrides, match):
    with pytest.raises(ValueError, match=match):
        _trainer(tiny_model_path, tmp_path, dataset, **overrides)


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"loss_type": "dpo"}, "loss_type='dpo'"),
        ({"loss_type": "graddiff", "retain_weight": 0.0}, "retain_weight"),
        ({"beta": -1.0}, "beta=-1.0"),
        ({"budget": 0}, "budget=0"),
        ({"budget": 2.5}, "budget=2.5"),
        ({"reweight_steps": 0}, "reweight_steps"),
        ({"max_weight": 0.5}, "max_weight"),
        ({"retain_loss": "l2"}, "retain_loss"),
    ],
)
def test_bad_config_raises_clear_errors(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        cpu_args(tmp_path, **overrides)


def test_cli_parses_yaml_and_runs_two_steps(tiny_model_path, tmp_path):
    import json

    import yaml

    from trl_u2a.cli import main

    data = tmp_path / "negatives.jsonl"
    with open(data, "w") as f:
        for p, c, r in zip(PROMPTS, CHOSEN, REJECTED):
            f.write(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n")
    config = {
        "model_name_or_path": tiny_model_path,
        "dataset_name": str(data),
        "output_dir": str(tmp_path / "out"),
        "loss_type": "npo",
        "max_steps": 2,
        "per_device_train_batch_size": 2,
        "use_cpu": True,
        "bf16": False,
        "gradient_checkpointing": False,
        "report_to": "none",
        "save_strategy": "no",
        "max_length": 64,
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["train", "--config", str(path), "--learning_rate", "1e-3"]) == 0
    assert (tmp_path / "out" / "model.safetensors").exists()


def test_saved_model_carries_a_u2a_model_card(tiny_model_path, tmp_path, preference_dataset):
    alignment = Dataset.from_dict({"prompt": PROMPTS, "chosen": CHOSEN, "rejected": REJECTED})
    trainer = U2ATrainer(
        model=tiny_model_path,
        args=cpu_args(tmp_path / "run", loss_type="npo", budget=3, auto_budget=False, reweight_steps=1, max_steps=2),
        train_dataset=preference_dataset,
        alignment_dataset=alignment,
    )
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    card = (tmp_path / "final" / "README.md").read_text()
    assert "## U2A: what was unlearned" in card
    assert "| `loss_type` | `npo` |" in card and "| `budget` | `3` |" in card
    selected = int((trainer.weight_state.weights > 0).sum())
    assert f"selected at the end: {selected} (budget 3)" in card
    assert "Weights of the selected negatives: min" in card and "alignment objective J" in card
    assert "@article{feng2025u2a" in card


def test_a_launch_that_accelerate_runs_alone_is_refused(monkeypatch, caplog):
    """`accelerate launch --num_processes 2` without `use_cpu` on a CPU machine: each rank sees WORLD_SIZE=2 but
    accelerate runs it alone (DistributedType.NO). That used to train twice independently and exit 0; the check the
    trainer runs after building its accelerator refuses it with the fix, and logs the world size otherwise."""
    import types

    from accelerate import PartialState

    from trl_u2a.distributed import check_process_count

    PartialState()  # accelerate's logger needs its state, as in a trainer
    alone = types.SimpleNamespace(
        num_processes=1, device="cpu", state=types.SimpleNamespace(distributed_type="NO", mixed_precision="no")
    )
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match=r"one of 2 launched .* ACCELERATE_USE_CPU=true"):
        check_process_count(alone)
    monkeypatch.delenv("WORLD_SIZE")
    with caplog.at_level("INFO"):
        check_process_count(alone)
    assert any("1 process(es), distributed type NO, mixed precision no" in m for m in caplog.messages)


@pytest.mark.parametrize(
    ("name", "value"), [("desirable_weight", 2.0), ("train_sampling_strategy", "random"), ("sync_ref_model", True)]
)
def test_inert_kto_options_are_refused(name, value, tmp_path):
    """A KTO option U2A never reads would silently do nothing: setting it is an error naming it."""
    with pytest.raises(ValueError, match=f"{name}=.*U2A never reads them"):
        U2AConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, **{name: value})
    U2AConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False)  # their defaults pass


def test_constructor_follows_trl_order_and_refuses_what_it_cannot_honour(tiny_model_path, tmp_path):
    """Positional arguments in TRL's order (model, ref_model, args, data_collator, train_dataset, ...); U2A's inputs
    are keyword-only; a data_collator or compute_metrics is refused before any model is loaded."""
    import inspect

    names = list(inspect.signature(U2ATrainer.__init__).parameters)[1:13]
    assert names == list(inspect.signature(KTOTrainer.__init__).parameters)[1:13]
    params = inspect.signature(U2ATrainer.__init__).parameters
    assert params["alignment_dataset"].kind is inspect.Parameter.KEYWORD_ONLY
    args = cpu_args(tmp_path)
    data = Dataset.from_dict({"prompt": ["a"], "completion": [" b"], "label": [False]})
    with pytest.raises(ValueError, match="does not take a data_collator"):
        U2ATrainer(str(tiny_model_path), None, args, lambda rows: rows, data)
    with pytest.raises(ValueError, match="does not take compute_metrics"):
        U2ATrainer(str(tiny_model_path), args=args, train_dataset=data, compute_metrics=lambda p: {})


def test_disable_tqdm_silences_every_progress_bar(tiny_model_path, tmp_path, preference_dataset, capfd, monkeypatch):
    """`disable_tqdm=True` also reaches datasets' map bars (tokenizing the negatives and the pairs), the reference
    log-prob pass and the refresh's scoring bar; with it off they show."""
    from datasets import disable_caching, enable_caching
    from datasets.utils import logging as datasets_logging

    monkeypatch.delenv("TQDM_DISABLE", raising=False)  # conftest's global switch would hide the bars either way
    alignment = Dataset.from_dict({"prompt": PROMPTS, "chosen": CHOSEN, "rejected": REJECTED})
    disable_caching()  # a cached map shows no bar either way
    bars_were_enabled = datasets_logging.is_progress_bar_enabled()  # another test's CLI may have switched them off
    datasets_logging.enable_progress_bar()
    try:
        for disable in (False, True):
            capfd.readouterr()
            trainer = U2ATrainer(
                model=tiny_model_path,
                args=cpu_args(tmp_path / str(disable), loss_type="npo", max_steps=1, disable_tqdm=disable),
                train_dataset=preference_dataset,
                alignment_dataset=alignment,
            )
            trainer.train()
            err = capfd.readouterr().err
            bars = [name for name in ("Tokenizing", "U2A refresh", "reference log-probs") if name in err]
            if disable:
                assert not bars, err[-2000:]
            else:  # datasets shows no map bar on these few rows: the two bars of U2A's own passes stand for it
                assert {"U2A refresh", "reference log-probs"} <= set(bars), err[-2000:]
            assert datasets_logging.is_progress_bar_enabled()  # switched off for the trainer only, then restored
    finally:
        enable_caching()
        if not bars_were_enabled:
            datasets_logging.disable_progress_bar()
