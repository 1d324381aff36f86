"""The demo's alignment-set size (`alignment_pairs`) and its DPO-on-the-pairs baseline (`dpo-pairs`): what a user
with a few dozen preference pairs would compare U2A with."""

import pytest
from test_demo_base_rate import demo_cli_config

from trl_u2a import demo
from trl_u2a.demo import DemoConfig
from trl_u2a.demo.models import load_task


def _pairs(split) -> list[tuple[str, str, str]]:
    return list(zip(split["prompt"], split["chosen"], split["rejected"]))


def test_alignment_pairs_keeps_a_seeded_subset_of_the_pairs_and_nothing_else():
    full = load_task(0, DemoConfig())
    cut = load_task(0, DemoConfig(alignment_pairs=32))
    assert len(full["alignment"]) == 80 and len(cut["alignment"]) == 32
    assert set(_pairs(cut["alignment"])) <= set(_pairs(full["alignment"]))
    # The same subset for the same seed, another for another seed
    assert _pairs(load_task(0, DemoConfig(alignment_pairs=32))["alignment"]) == _pairs(cut["alignment"])
    assert (
        _pairs(load_task(1, DemoConfig(alignment_pairs=32))["alignment"])
        != _pairs(load_task(1, DemoConfig())["alignment"])[:32]
    )
    # The negatives, the held-out pairs and the test prompts stay those of the full task
    for split in ("forget", "retain", "test_pairs", "test_prompts"):
        assert full[split].to_list() == cut[split].to_list()
    # So the start model (keyed by its settings and the negatives' data) is the same
    assert DemoConfig(alignment_pairs=32).start_model_settings(0) == DemoConfig().start_model_settings(0)


@pytest.mark.parametrize("pairs", [0, -3, 2.5, "32", True])
def test_alignment_pairs_must_be_a_whole_number(pairs):
    with pytest.raises(ValueError, match=rf"alignment_pairs={pairs!r} must be a whole number ≥ 1"):
        DemoConfig(alignment_pairs=pairs)


def test_more_alignment_pairs_than_the_task_has_is_refused():
    with pytest.raises(ValueError, match="alignment_pairs=200 is more than the task's 80 alignment pairs"):
        load_task(0, DemoConfig(alignment_pairs=200))


def test_cli_passes_alignment_pairs(monkeypatch, tmp_path):
    config = demo_cli_config(monkeypatch, ["--output_dir", str(tmp_path), "--full", "--alignment_pairs", "32"])
    assert config.alignment_pairs == 32
    assert demo_cli_config(monkeypatch, ["--output_dir", str(tmp_path)]).alignment_pairs is None


def test_dpo_pairs_is_planned_once_per_setting_and_trains_on_the_alignment_pairs_alone(monkeypatch, tmp_path):
    from trl_u2a.demo import runs

    config = DemoConfig(settings=("lora",), losses=("ga", "npo"), methods=("u2a", "dpo-pairs"), preconditioners=())
    planned = [(r["loss"], r["method"]) for r in demo.plan_runs(config)]
    assert planned.count(("dpo", "dpo-pairs")) == 1 and ("dpo", "dpo") not in planned

    seen = []

    class FakeDPOTrainer:
        def __init__(self, *, train_dataset, **kwargs):
            seen.append(train_dataset)
            raise RuntimeError("stop after the data is built")

    monkeypatch.setattr(runs, "DPOTrainer", FakeDPOTrainer)
    monkeypatch.setattr(runs.AutoTokenizer, "from_pretrained", staticmethod(lambda path: None))
    splits = load_task(0, DemoConfig(alignment_pairs=32))
    for pairs_only in (True, False):
        with pytest.raises(RuntimeError, match="stop after"):
            runs.run_dpo(
                "model", splits, config, seed=0, learning_rate=1e-4, output_dir=str(tmp_path), pairs_only=pairs_only
            )
    alone, positive = seen
    assert _pairs(alone) == _pairs(splits["alignment"])
    # "dpo" adds every negative paired with a chosen answer of its prompt to the same pairs
    assert len(positive) > len(alone) and set(_pairs(alone)) <= set(_pairs(positive))


def test_unknown_method_names_the_dpo_methods():
    with pytest.raises(ValueError, match=r"methods has unknown entries \['dpo_pairs'\].*'dpo', 'dpo-pairs'"):
        DemoConfig(methods=("dpo_pairs",))
