"""A checkpoint is marked complete (`trainer_state.json`) only after every rank has written its files, whatever
`save_only_model` leaves out; the one rule for "this holds a U2A state" serves both the resume and the completeness
check."""

import os

import pytest
from conftest import cpu_args

from trl_u2a import U2ATrainer
from trl_u2a.safe_state import (
    LEGACY_STATE_FILE,
    STATE_JSON,
    STATE_TENSORS,
    TRAINER_STATE,
    checkpoint_problem,
    load_checkpoint_state,
    state_format,
)


@pytest.mark.parametrize("save_only_model", [True, False])
def test_the_mark_of_a_complete_checkpoint_follows_a_barrier_after_every_file(
    tiny_model_path, tmp_path, preference_dataset, save_only_model
):
    trainer = U2ATrainer(
        model=tiny_model_path,
        args=cpu_args(
            tmp_path,
            loss_type="ga",
            max_steps=3,
            save_strategy="steps",
            save_steps=1,
            save_total_limit=2,
            save_only_model=save_only_model,
        ),
        train_dataset=preference_dataset,
    )
    # What each checkpoint directory held whenever the ranks met
    seen = []
    barrier = trainer.accelerator.wait_for_everyone

    def wait_for_everyone():
        for name in sorted(os.listdir(tmp_path)):
            if name.startswith("checkpoint-"):
                seen.append((name, set(os.listdir(tmp_path / name))))
        barrier()

    trainer.accelerator.wait_for_everyone = wait_for_everyone
    trainer.train()
    last_file = "model.safetensors" if save_only_model else "rng_state.pth"
    for step in (1, 2, 3):
        name = f"checkpoint-{step}"
        met = [files for seen_name, files in seen if seen_name == name]
        # A barrier after the model (and, when saved, the RNG state), before the mark
        assert any(last_file in files and TRAINER_STATE not in files for files in met), (name, met)
    # save_total_limit still applies, once the newest checkpoint is complete
    assert sorted(n for n in os.listdir(tmp_path) if n.startswith("checkpoint-")) == ["checkpoint-2", "checkpoint-3"]
    for name in ("checkpoint-2", "checkpoint-3"):
        assert checkpoint_problem(str(tmp_path / name)) is None
        assert not any(f.endswith(".tmp") for f in os.listdir(tmp_path / name))


def test_one_rule_says_which_u2a_state_a_directory_holds(tmp_path):
    assert state_format(str(tmp_path)) is None
    with pytest.raises(FileNotFoundError, match=f"has no {STATE_JSON} and {STATE_TENSORS}"):
        load_checkpoint_state(str(tmp_path))
    assert "not written by U2ATrainer" in checkpoint_problem(str(tmp_path))
    (tmp_path / STATE_JSON).write_text("{}")
    assert state_format(str(tmp_path)) is None  # the JSON alone: the tensors were not written
    (tmp_path / STATE_TENSORS).write_bytes(b"")
    assert state_format(str(tmp_path)) == "safetensors"
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / LEGACY_STATE_FILE).write_bytes(b"")
    assert state_format(str(legacy)) == "legacy"
