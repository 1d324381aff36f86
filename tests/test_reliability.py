"""Reliability: malformed input gets a ValueError, numerical failures are caught, killed runs resume exactly."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import CHOSEN, PROMPTS, REJECTED, cpu_args
from datasets import Dataset
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import TrainerCallback

from trl_u2a import U2ATrainer
from trl_u2a.safe_state import last_complete_checkpoint

HERE = os.path.dirname(__file__)

# ------------------------------------------------------------------------------------------------ malformed input
TEXT = st.text(min_size=1, max_size=12)
# Integers within int64: a larger Python int cannot become an Arrow column at all, before U2A sees it
INT64 = st.integers(-(2**63), 2**63 - 1)


@st.composite
def malformed_datasets(draw):
    """A dataset with at least one defect: a missing or misspelled column, a non-bool label, a non-text prompt or
    completion, a missing value, a bad weight, no negatives, or no rows."""
    n = draw(st.integers(min_value=1, max_value=5))
    columns = {"prompt": [draw(TEXT) for _ in range(n)], "completion": [draw(TEXT) for _ in range(n)]}
    defect = draw(
        st.sampled_from(
            ["drop", "rename", "label_type", "text_type", "none", "weight", "no_negatives", "empty", "chosen_only"]
        )
    )
    if defect == "drop":
        del columns[draw(st.sampled_from(["prompt", "completion"]))]
    elif defect == "rename":
        columns[draw(st.sampled_from(["promt", "completions", "response"]))] = columns.pop("completion")
    elif defect == "label_type":
        columns["label"] = draw(st.lists(st.one_of(st.integers(0, 1), st.just("False")), min_size=n, max_size=n))
        if all(isinstance(v, int) for v in columns["label"]):
            columns["label"] = [int(v) for v in columns["label"]]
        else:
            columns["label"] = [str(v) for v in columns["label"]]
    elif defect == "text_type":
        columns[draw(st.sampled_from(["prompt", "completion"]))] = [draw(INT64) for _ in range(n)]
    elif defect == "none":
        column = draw(st.sampled_from(["prompt", "completion"]))
        columns[column][draw(st.integers(0, n - 1))] = None
    elif defect == "weight":
        bad = draw(st.sampled_from([-1.0, float("nan"), float("inf")]))
        weights = [1.0] * n
        weights[draw(st.integers(0, n - 1))] = bad
        columns["weight"] = weights
    elif defect == "no_negatives":
        columns["label"] = [True] * n
    elif defect == "empty":
        columns = {"prompt": [], "completion": []}
    elif defect == "chosen_only":
        columns = {"prompt": columns["prompt"], "chosen": columns["completion"]}
    return Dataset.from_dict(columns)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(dataset=malformed_datasets())
def test_malformed_train_datasets_raise_value_error(tiny_model_path, tmp_path, dataset):
    with pytest.raises(ValueError) as error:
        U2ATrainer(model=tiny_model_path, args=cpu_args(tmp_path), train_dataset=dataset)
    assert "train_dataset" in str(error.value)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    defect=st.sampled_from(["no_pairs", "empty", "text_type", "none"]),
    n=st.integers(min_value=1, max_value=4),
)
def test_malformed_alignment_sets_raise_value_error(tiny_model_path, tmp_path, preference_dataset, defect, n):
    pairs = {"prompt": PROMPTS[:n], "chosen": CHOSEN[:n], "rejected": REJECTED[:n]}
    if defect == "no_pairs":
        del pairs["rejected"]
    elif defect == "empty":
        pairs = {k: [] for k in pairs}
    elif defect == "text_type":
        pairs["chosen"] = list(range(n))
    else:
        pairs["rejected"] = [None] * n
    with pytest.raises(ValueError, match="alignment_dataset"):
        U2ATrainer(
            model=tiny_model_path,
            args=cpu_args(tmp_path),
            train_dataset=preference_dataset,
            alignment_dataset=Dataset.from_dict(pairs),
        )


NUMERIC_FIELDS = {
    "beta": st.one_of(st.floats(max_value=0.0), st.just(float("nan"))),
    "beta_pa": st.one_of(st.floats(max_value=0.0), st.just(float("inf"))),
    "budget": st.one_of(
        st.floats(max_value=0.0),
        st.floats(min_value=1.01, max_value=1e6).filter(lambda x: x % 1),
        st.just(float("nan")),
    ),
    "reweight_steps": st.integers(max_value=0),
    "pool_size": st.integers(max_value=-1),
    "patience": st.integers(max_value=-1),
    "weight_lr": st.floats(max_value=-1e-9),
    "score_clip": st.floats(max_value=0.0),
    "max_weight": st.one_of(st.floats(max_value=0.999), st.just(float("inf"))),
    "sparsity": st.floats(max_value=-1e-9),
    "damping": st.floats(max_value=-1e-9),
    "retain_weight": st.one_of(st.floats(max_value=-1e-9), st.just(float("nan"))),
    "pa_samples": st.integers(max_value=0),
    "retain_nll_tolerance": st.floats(max_value=0.0),
    "loss_type": st.text(max_size=8).filter(lambda s: s not in ("ga", "graddiff", "npo", "simnpo")),
    "preconditioner": st.text(max_size=8).filter(lambda s: s not in ("identity", "adam", "fisher")),
    "weighting": st.text(max_size=8).filter(lambda s: s not in ("loss", "sampling")),
    "retain_loss": st.text(max_size=8).filter(lambda s: s not in ("nll", "kl")),
}


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_out_of_range_config_values_raise_value_error(tmp_path, data):
    name = data.draw(st.sampled_from(sorted(NUMERIC_FIELDS)))
    value = data.draw(NUMERIC_FIELDS[name])
    with pytest.raises(ValueError) as error:
        cpu_args(tmp_path, **{name: value})
    assert name in str(error.value)


def test_unknown_config_names_in_a_recipe_raise_value_error(tmp_path):
    from trl_u2a.scripts.u2a import make_parser

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("output_dir: out\nuse_cpu: true\nbf16: false\nbudgett: 0.5\n")
    with pytest.raises(ValueError, match="budgett"):
        make_parser().parse_args_and_config(args=["--config", str(recipe)])


def test_duplicated_ids_raise_value_error(tiny_model_path, tmp_path):
    dataset = Dataset.from_dict({"prompt": PROMPTS[:3], "completion": REJECTED[:3], "id": ["a", "b", "a"]})
    with pytest.raises(ValueError, match="rows 0 and 2 both have id 'a'"):
        U2ATrainer(model=tiny_model_path, args=cpu_args(tmp_path), train_dataset=dataset)


def _with_blank(columns: dict, column: str, row: int, blank) -> Dataset:
    columns = {k: list(v) for k, v in columns.items()}
    columns[column][row] = blank
    return Dataset.from_dict(columns)


@pytest.mark.parametrize("blank", ["", "  \n\t"])
@pytest.mark.parametrize(
    "columns, column",
    [
        ({"prompt": PROMPTS, "completion": REJECTED}, "completion"),
        ({"prompt": PROMPTS, "completion": REJECTED}, "prompt"),
        ({"prompt": PROMPTS, "completion": REJECTED, "label": [False, True] * 3}, "completion"),
        ({"prompt": PROMPTS, "chosen": CHOSEN, "rejected": REJECTED}, "rejected"),
        ({"prompt": PROMPTS, "chosen": CHOSEN, "rejected": REJECTED}, "chosen"),
        ({"chosen": [p + c for p, c in zip(PROMPTS, CHOSEN)], "rejected": REJECTED}, "rejected"),
    ],
)
def test_empty_or_whitespace_texts_are_refused_with_row_and_column(tiny_model_path, tmp_path, columns, column, blank):
    with pytest.raises(ValueError, match=rf"train_dataset: column '{column}' is empty or whitespace-only at row 4"):
        U2ATrainer(model=tiny_model_path, args=cpu_args(tmp_path), train_dataset=_with_blank(columns, column, 4, blank))


@pytest.mark.parametrize("column", ["prompt", "chosen", "rejected"])
def test_empty_alignment_texts_are_refused_with_row_and_column(tiny_model_path, tmp_path, preference_dataset, column):
    pairs = {"prompt": PROMPTS, "chosen": CHOSEN, "rejected": REJECTED}
    pairs[column] = [pairs[column][0], ""] + [" "] * 4
    with pytest.raises(ValueError, match=rf"alignment_dataset: column '{column}' is empty .* at row 1 \(and 4 more"):
        U2ATrainer(
            model=tiny_model_path,
            args=cpu_args(tmp_path),
            train_dataset=preference_dataset,
            alignment_dataset=Dataset.from_dict(pairs),
        )


def test_conversations_without_text_are_refused(tiny_model_path, tmp_path, conversational_preference_dataset):
    rows = conversational_preference_dataset.to_dict()
    rows["rejected"][2] = [{"role": "assistant", "content": "   "}]
    with pytest.raises(ValueError, match="column 'rejected' is empty or whitespace-only at row 2"):
        U2ATrainer(model=tiny_model_path, args=cpu_args(tmp_path), train_dataset=Dataset.from_dict(rows))


# --------------------------------------------------------------------------------------------- numerical guards
class PoisonAt(TrainerCallback):
    """Sets every trainable parameter to NaN at the start of optimizer step `step`."""

    def __init__(self, trainer, step):
        self.trainer, self.step = trainer, step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.step:
            with torch.no_grad():
                for p in self.trainer.model.parameters():
                    if p.requires_grad:
                        p.fill_(float("nan"))


def test_nan_loss_stops_with_where_and_when_and_keeps_the_last_good_checkpoint(
    tiny_model_path, tmp_path, preference_dataset
):
    trainer = U2ATrainer(
        model=tiny_model_path,
        args=cpu_args(tmp_path, loss_type="ga", max_steps=5, save_strategy="steps", save_steps=1),
        train_dataset=preference_dataset,
    )
    trainer.add_callback(PoisonAt(trainer, 3))
    with pytest.raises(FloatingPointError, match="optimizer step 3"):
        trainer.train()
    last = last_complete_checkpoint(str(tmp_path))
    assert last.endswith("checkpoint-2")
    from safetensors.torch import load_file

    assert all(torch.isfinite(t).all() for t in load_file(os.path.join(last, "model.safetensors")).values())


def test_non_finite_scores_skip_the_refresh_and_keep_the_weights(tiny_model_path, tmp_path, preference_dataset):
    from trl_u2a.core.objectives import CallableObjective, DPOObjective

    dpo = DPOObjective(0.1)
    trainer = None

    def objective(model, batch):
        losses = dpo(model, batch)
        # Refresh 1 (of 0, 1, 2) sees NaN
        return losses * float("nan") if trainer.refresh_callback.controller.refresh_index == 1 else losses

    alignment = Dataset.from_dict({"prompt": PROMPTS, "chosen": CHOSEN, "rejected": REJECTED})
    trainer = U2ATrainer(
        model=tiny_model_path,
        args=cpu_args(tmp_path, loss_type="ga", budget=3, reweight_steps=2, max_steps=5, per_device_train_batch_size=8),
        train_dataset=preference_dataset,
        alignment_dataset=alignment,
        alignment_objective=CallableObjective(objective, needs_reference=True),
    )
    trainer.train()
    first, second, third = trainer.refresh_callback.history[:3]
    assert "skipped" not in first and "non-finite" in second["skipped"] and "skipped" not in third
    assert first["weights"] == second["weights"]
    # The refresh after a skip has an id of its own, in its record and in its trace rows
    assert [r["refresh"] for r in (first, second, third)] == [0, 1, 2]
    with open(os.path.join(tmp_path, "u2a_refreshes.jsonl")) as f:
        written = [json.loads(line)["refresh"] for line in f]
    assert written[:3] == [0, 1, 2]
    with open(os.path.join(tmp_path, "u2a_trace.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert {row["refresh"] for row in rows} == {0, 1, 2}
    for refresh in (0, 1, 2):  # one row per negative and refresh: the rows of refresh 2 did not join refresh 1's
        ids = [row["example_id"] for row in rows if row["refresh"] == refresh]
        assert len(ids) == len(set(ids))


def test_collapse_guard_stops_and_restores_the_last_good_adapter(tiny_model_path, tmp_path, preference_dataset):
    from peft import LoraConfig

    alignment = Dataset.from_dict({"prompt": PROMPTS, "chosen": CHOSEN, "rejected": REJECTED})
    trainer = U2ATrainer(
        model=tiny_model_path,
        args=cpu_args(
            tmp_path,
            loss_type="ga",
            budget=6,
            reweight_steps=3,
            max_steps=30,
            learning_rate=0.05,
            retain_nll_tolerance=0.1,
            per_device_train_batch_size=4,
            # the identity query at step 0 (no estimated moments) is what drives this run into collapse in 6 steps
            preconditioner_batches=0,
        ),
        train_dataset=preference_dataset,
        alignment_dataset=alignment,
        peft_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    trainer.train()
    stopped = trainer.refresh_callback.history[-1]
    if stopped.get("final"):
        stopped = trainer.refresh_callback.history[-2]
    assert "collapse guard" in stopped["stopped"]
    assert trainer.state.global_step < 30
    restored = stopped["restored_step"]
    before = next(r for r in trainer.refresh_callback.history if r["step"] == restored)
    # The restored model has the retain NLL measured at that earlier refresh
    with torch.no_grad():
        nll = trainer.refresh_callback.controller._retain_nll(trainer.accelerator.unwrap_model(trainer.model))
    assert nll == pytest.approx(before["retain_nll"], rel=1e-5)
    assert stopped["retain_nll"] > before["retain_nll"] + 0.1


# ------------------------------------------------------------------------------------------- reproducibility
def test_same_seed_same_selection_weights_and_adapter(tiny_model_path, tmp_path):
    from peft import LoraConfig

    alignment = Dataset.from_dict({"prompt": PROMPTS, "chosen": CHOSEN, "rejected": REJECTED})
    negatives = Dataset.from_dict({"prompt": PROMPTS + PROMPTS, "completion": REJECTED + CHOSEN})

    def run(name):
        trainer = U2ATrainer(
            model=tiny_model_path,
            args=cpu_args(tmp_path / name, loss_type="npo", budget=5, reweight_steps=2, max_steps=5),
            train_dataset=negatives,
            alignment_dataset=alignment,
            peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"),
        )
        trainer.train()
        return trainer.weight_state.weights, {
            n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad
        }

    (w1, a1), (w2, a2) = run("a"), run("b")
    assert torch.equal(w1, w2)
    assert all(torch.equal(a1[n], a2[n]) for n in a1)


# ------------------------------------------------------------------------------------------------ kill and resume
@pytest.mark.slow
def test_sigkill_at_a_save_a_refresh_and_a_step_then_resume_is_bitwise_exact(tiny_model_path, tmp_path):
    script = os.path.join(HERE, "scripts", "u2a_run.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    common = ["max_steps=8", "save_strategy=steps", "save_steps=1"]

    def run(out, output_dir, *extra):
        return subprocess.run(
            [sys.executable, script, tiny_model_path, str(out), "4", f"output_dir={output_dir}", *common, *extra],
            env=env,
            capture_output=True,
            text=True,
        )

    assert run(tmp_path / "full.json", tmp_path / "full").returncode == 0
    resumed = tmp_path / "resumed"
    # Killed after writing the U2A state and the model of checkpoint 3 but before its trainer_state.json
    assert run(tmp_path / "r.json", resumed, "kill_at=save:3").returncode == -9
    assert last_complete_checkpoint(str(resumed)).endswith("checkpoint-2")
    kills = 1
    for kill in ("refresh:2", "step:7"):  # inside a refresh, then in the middle of training
        assert run(tmp_path / "r.json", resumed, f"kill_at={kill}", "resume=true").returncode == -9
        kills += 1
    result = run(tmp_path / "r.json", resumed, "resume=true")
    assert result.returncode == 0, result.stderr[-3000:]
    full, again = json.loads((tmp_path / "full.json").read_text()), json.loads((tmp_path / "r.json").read_text())
    assert kills == 3
    assert again["weights"] == full["weights"]
    assert again["objective"] == full["objective"]
    for name, values in full["params"].items():
        assert again["params"][name] == values, name
    assert all(math.isfinite(w) for w in again["weights"])
