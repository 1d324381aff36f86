"""The U2A checkpoint state is safetensors + JSON: it round-trips exactly and a crafted pickle is never run."""

import json
import os

import pytest
import torch
from conftest import CHOSEN, PROMPTS, REJECTED, cpu_args
from datasets import Dataset

from trl_u2a import U2ATrainer
from trl_u2a.safe_state import (
    LEGACY_STATE_FILE,
    STATE_JSON,
    STATE_TENSORS,
    decode,
    encode,
    load_legacy_state,
    load_state,
    save_state,
)


def same(a, b) -> bool:
    """Exact equality: same Python types and keys in the same order, tensors equal in dtype, shape and bits."""
    if type(a) is not type(b):
        return False
    if isinstance(a, torch.Tensor):
        return (
            a.dtype == b.dtype
            and a.shape == b.shape
            and torch.equal(a.contiguous().view(-1).view(torch.uint8), b.contiguous().view(-1).view(torch.uint8))
        )
    if isinstance(a, float):
        return (a != a and b != b) or a == b
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    return a == b


def test_any_plain_state_round_trips_exactly(tmp_path):
    # The shapes of the real state (history records, per-rank fresh scores keyed by negative id, a query list with
    # None, sampler tuples) plus keys a later version may add: none of them needs code here
    state = {
        "weights": {"weights": torch.rand(5, dtype=torch.float64), "scores": torch.randn(5).double(), "refresh": 3},
        "sampler": {
            "epoch": 1,
            "version": 2,
            "current": torch.rand(5, dtype=torch.float64),
            "table": [(0, 1, torch.rand(5, dtype=torch.float64)), (4, 2, torch.rand(5, dtype=torch.float64))],
        },
        "refresh": {
            "history": [{"refresh": 0, "step": 0, "objective": 0.6931471805599453, "skipped": None}, {"final": True}],
            "fresh_scores": [{3: ((7, 0), 0.25), 11: ((7, 1), -1e-300)}, {}],
            "query": [torch.randn(2, 3), None, torch.randn(4, dtype=torch.bfloat16)],
            "query_attrs": {"objective_value": 0.5, "num_pairs": 6, "preconditioner": "adam"},
            "ref_pair_logps": torch.randn(6, 2),
            "best_objective": float("inf"),
            "nan": float("nan"),
            "new_plain_key": {"a": [1, 2.5, "x", None, True, False, []], "nested": {"b": {}}},
            "looks_like_a_tag": {"__tensor__": "not a tensor"},
            "tuple_key": {(1, 2): "pair"},
            "empty": torch.zeros(0, dtype=torch.int64),
            "scalar": torch.tensor(3),
            "mask": torch.tensor([True, False]),
            "view": torch.arange(10.0)[::3],
        },
    }
    save_state(state, str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == sorted([STATE_JSON, STATE_TENSORS])
    assert same(load_state(str(tmp_path)), state)
    assert same(decode(*encode(state)), state)


def test_a_value_that_is_not_plain_is_refused_where_it_is_saved():
    import numpy as np

    with pytest.raises(TypeError, match=r"state\['refresh'\]\['x'\]\[1\].*numpy"):
        encode({"refresh": {"x": [1, np.int64(2)]}})


def _run(output_dir, resume=None, **overrides):
    negatives = Dataset.from_dict({"prompt": PROMPTS + PROMPTS, "completion": REJECTED + CHOSEN})
    alignment = Dataset.from_dict({"prompt": PROMPTS, "chosen": CHOSEN, "rejected": REJECTED})
    args = cpu_args(
        output_dir,
        loss_type="npo",
        budget=6,
        reweight_steps=2,
        max_steps=4,
        save_strategy="steps",
        save_steps=2,
        **overrides,
    )
    trainer = U2ATrainer(model=_run.model, args=args, train_dataset=negatives, alignment_dataset=alignment)
    trainer.train(resume_from_checkpoint=resume)
    return trainer


@pytest.mark.parametrize("weighting", ["loss", "sampling"])
def test_checkpoints_hold_no_pickle_and_a_crafted_one_never_runs(tiny_model_path, tmp_path, weighting):
    _run.model = tiny_model_path
    full = _run(tmp_path / "full", weighting=weighting)
    checkpoint = tmp_path / "full" / "checkpoint-2"
    assert (checkpoint / STATE_JSON).is_file() and (checkpoint / STATE_TENSORS).is_file()
    assert not (checkpoint / LEGACY_STATE_FILE).exists()
    json.loads((checkpoint / STATE_JSON).read_text())  # plain JSON, readable by anything
    state = load_state(str(checkpoint))
    assert {"weights", "refresh", "sampler"} <= set(state)
    assert all(type(entry) is tuple for entry in state["sampler"]["table"])

    # An earlier trl-u2a's pickle holding the same plain state still resumes, to the same end
    legacy = tmp_path / "legacy"
    os.makedirs(legacy)
    os.system(f"cp -r {checkpoint} {legacy}/")
    old = legacy / "checkpoint-2"
    torch.save(state, old / LEGACY_STATE_FILE)
    os.remove(old / STATE_JSON)
    os.remove(old / STATE_TENSORS)
    resumed = _run(tmp_path / "resumed", resume=str(old), weighting=weighting)
    assert torch.equal(resumed.weight_state.weights, full.weight_state.weights)

    # A crafted pickle: its __reduce__ would write a file when unpickled
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w').write('ran')",))

    torch.save({"weights": Payload()}, old / LEGACY_STATE_FILE)
    with pytest.raises(ValueError, match=r"Refusing to load .*u2a_state\.pt: it is a pickle that asks to build .*exec"):
        _run(tmp_path / "attacked", resume=str(old), weighting=weighting)
    assert not marker.exists()
    with pytest.raises(ValueError, match="Refusing to load"):
        load_legacy_state(str(old / LEGACY_STATE_FILE))
    assert not marker.exists()
