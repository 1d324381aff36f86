"""`U2ATrainer.__init__` is a sequence of named steps whose order is what makes it work: the test pins the order,
and what each step hands to the next."""

import pytest
from conftest import CHOSEN, PROMPTS, REJECTED, cpu_args
from datasets import Dataset

from trl_u2a import U2ATrainer

STEPS = [
    "_u2a_arguments",
    "_checked_inputs",
    "_build_kto_trainer",
    "_add_reference_logps",
    "_install_weights",
    "_install_refresh",
]


@pytest.fixture
def recorded(monkeypatch):
    """The steps `U2ATrainer.__init__` runs and the reference passes it makes, in order."""
    calls = []
    for name in [*STEPS, "_reference_values"]:
        original = getattr(U2ATrainer, name)

        def step(self, *args, _name=name, _original=original, **kwargs):
            calls.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(U2ATrainer, name, step)
    return calls


@pytest.mark.parametrize("retain_loss", ["nll", "kl"])
def test_the_constructor_runs_its_steps_in_order(tiny_model_path, tokenizer, tmp_path, recorded, retain_loss):
    negatives = Dataset.from_dict(
        {"prompt": PROMPTS * 2, "completion": REJECTED + CHOSEN, "label": [False] * 6 + [True] * 6}
    )
    trainer = U2ATrainer(
        model=tiny_model_path,
        args=cpu_args(tmp_path, loss_type="npo", retain_weight=1.0, retain_loss=retain_loss, budget=3),
        train_dataset=negatives,
        alignment_dataset=Dataset.from_dict({"prompt": PROMPTS, "chosen": CHOSEN, "rejected": REJECTED}),
    )
    # One reference pass, by U2A after the TRL trainer is built: KTO's own call inside its constructor adds nothing,
    # and with the KL retain term (where KTO keeps a reference model and would not call it) the column is there too
    assert recorded == [*STEPS[:4], "_reference_values", *STEPS[4:]]
    assert "ref_logps" in trainer.train_dataset.column_names
    assert (trainer.ref_model is not None) == (retain_loss == "kl")
    # KTO's `_prepare_dataset` gave the collator its pad id; the budget and the refresh come last
    assert trainer._collator.pad_token_id == tokenizer.pad_token_id
    assert trainer.budget == 3 and trainer.refresh_callback in trainer.callback_handler.callbacks
