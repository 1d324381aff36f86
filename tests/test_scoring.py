"""Data selection without training: `score_negatives` and `trl-u2a score`."""

import json

import pytest
from conftest import CHOSEN, PROMPTS, REJECTED
from datasets import Dataset


def _planted():
    alignment = Dataset.from_dict({"prompt": PROMPTS, "chosen": CHOSEN, "rejected": REJECTED})
    negatives = Dataset.from_dict({"prompt": PROMPTS + PROMPTS, "completion": REJECTED + CHOSEN})
    return negatives, alignment


@pytest.mark.parametrize("loss_type", ["ga", "npo", "simnpo"])
def test_score_negatives_signs(tiny_model_path, tokenizer, loss_type):
    from transformers import AutoModelForCausalLM

    from trl_u2a import score_negatives

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    negatives, alignment = _planted()
    scored = score_negatives(model, tokenizer, negatives, alignment, loss_type=loss_type, beta=0.5, batch_size=4)
    assert scored["negative_id"] == list(range(12))
    scores = scored["score"]
    # Unlearning an alignment-set rejected response helps (s > 0); unlearning a chosen one hurts (s < 0)
    assert all(s > 0 for s in scores[:6]) and all(s < 0 for s in scores[6:])


def test_score_negatives_rejects_adam_preconditioner(tiny_model_path, tokenizer):
    from transformers import AutoModelForCausalLM

    from trl_u2a import score_negatives

    negatives, alignment = _planted()
    with pytest.raises(ValueError, match="preconditioner='adam'"):
        score_negatives(
            AutoModelForCausalLM.from_pretrained(tiny_model_path),
            tokenizer,
            negatives,
            alignment,
            preconditioner="adam",
        )


def test_score_cli_writes_jsonl_with_lora(tiny_model_path, tmp_path):
    from trl_u2a.cli import main

    negatives, alignment = _planted()
    negatives.to_json(tmp_path / "negatives.jsonl")
    alignment.to_json(tmp_path / "pairs.jsonl")
    out = tmp_path / "scores.jsonl"
    code = main(
        [
            "score",
            "--model_name_or_path",
            tiny_model_path,
            "--dataset_name",
            str(tmp_path / "negatives.jsonl"),
            "--alignment_dataset_name",
            str(tmp_path / "pairs.jsonl"),
            "--alignment_split",
            "train",
            "--output",
            str(out),
            "--loss_type",
            "ga",
            "--batch_size",
            "4",
            "--max_length",
            "64",
            "--use_peft",
            "--lora_r",
            "4",
            "--lora_target_modules",
            "all-linear",
            "--output_dir",
            str(tmp_path),
        ]
    )
    assert code == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 12 and {"prompt", "completion", "negative_id", "score"} <= set(rows[0])
    # A fresh LoRA adapter has B = 0, so only the B half carries gradient; the scores are still informative
    assert sum(r["score"] > 0 for r in rows[:6]) >= 5 and sum(r["score"] < 0 for r in rows[6:]) >= 5
