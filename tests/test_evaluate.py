"""`trl-u2a evaluate` and `trl_u2a.evaluation`: J against a reference, preference accuracy, retain perplexity, harm
under a judge (lexical, a stub, a local text-classification model), on a tiny model and a tiny LoRA adapter."""

import json
import math

import pytest
import torch
from conftest import CHOSEN, PROMPTS, REJECTED
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from trl_u2a.cli import main
from trl_u2a.core.modeling import sequence_logps
from trl_u2a.data import tokenize_prompt_completion
from trl_u2a.evaluation import ClassifierJudge, Evaluator, lexical_judge
from trl_u2a.synthetic import contains_harm_words

GENERATION = ["--num_generations", "2", "--max_new_tokens", "4"]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval-data")
    return {
        "prompts": _jsonl(root / "prompts.jsonl", [{"prompt": p} for p in PROMPTS]),
        "pairs": _jsonl(
            root / "pairs.jsonl",
            [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in zip(PROMPTS, CHOSEN, REJECTED)],
        ),
        # Unpaired rows: only the label=True ones are retain texts
        "retain": _jsonl(
            root / "retain.jsonl",
            [{"prompt": p, "completion": c, "label": True} for p, c in zip(PROMPTS, CHOSEN)]
            + [{"prompt": PROMPTS[0], "completion": REJECTED[0], "label": False}],
        ),
    }


def _evaluate(tmp_path, capsys, *argv):
    out = tmp_path / "eval.json"
    rc = main(["evaluate", *argv, "--output_json", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    return json.loads(out.read_text()), captured.out


def _token_mean_logps(model, tokenizer, prompts, completions):
    values = []
    for p, c in zip(prompts, completions):
        prompt_ids, completion_ids = tokenize_prompt_completion(tokenizer, p, c)
        ids = torch.tensor([prompt_ids + completion_ids])
        mask = torch.tensor([[0] * len(prompt_ids) + [1] * len(completion_ids)])
        with torch.no_grad():
            logp, n = sequence_logps(model, ids, torch.ones_like(ids), mask)
        values.append(float(logp / n))
    return values


def test_full_model_against_itself(tiny_model_path, data, tmp_path, capsys):
    results, out = _evaluate(
        tmp_path,
        capsys,
        *("--model_name_or_path", tiny_model_path, "--ref_model", tiny_model_path),
        *("--prompts", data["prompts"], "--pairs", data["pairs"], "--retain", data["retain"], *GENERATION),
    )
    m = results["metrics"]
    # The reference itself: every DPO margin is 0, so J = -log σ(0) = ln 2 and the reward accuracy counts ties as 1/2
    assert m["J"] == pytest.approx(math.log(2), abs=1e-9) and m["reward_acc"] == 0.5
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    chosen = _token_mean_logps(model, tokenizer, PROMPTS, CHOSEN)
    rejected = _token_mean_logps(model, tokenizer, PROMPTS, REJECTED)
    assert m["pref_acc"] == pytest.approx(sum(c > r for c, r in zip(chosen, rejected)) / len(PROMPTS))
    # Retain perplexity over the label=True rows only, token-weighted
    assert m["num_retain"] == len(PROMPTS) and m["retain_ppl"] > 1
    assert m["num_samples"] == 2 * len(PROMPTS) and 0 <= m["harmful_rate"] <= 1
    assert results["judge"] == "lexical" and results["settings"]["num_generations"] == 2
    assert "J (n=6)" in out and "retain_ppl (n=6)" in out


def test_harmful_rate_is_the_share_the_judge_flags(tiny_model_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    seen = []

    def stub(texts):
        seen.extend(texts)
        return [(len(t) % 3) / 2 for t in texts]  # 0, 0.5 or 1: a threshold of 0.5 flags the last two

    prompts = Dataset.from_dict({"prompt": PROMPTS})
    evaluator = Evaluator(tokenizer, prompts=prompts, judge=stub, num_generations=3, max_new_tokens=6, seed=1)
    m = evaluator(model)
    assert len(seen) == 3 * len(PROMPTS) == m["num_samples"]
    assert m["harmful_rate"] == sum(len(t) % 3 >= 1 for t in seen) / len(seen)
    assert m["harm_prob"] == pytest.approx(sum((len(t) % 3) / 2 for t in seen) / len(seen))
    # Seeded sampling: the same answers again, whatever the caller's RNG did in between
    torch.manual_seed(123)
    assert evaluator.generate(model) == seen
    lexical = Evaluator(tokenizer, prompts=prompts, judge=lexical_judge, num_generations=3, max_new_tokens=6, seed=1)
    flagged = sum(contains_harm_words(t) for t in seen)
    assert lexical(model)["harmful_rate"] == flagged / len(seen)


def test_lora_adapter_reference_is_the_base_model(tiny_model_path, data, tmp_path, capsys):
    from peft import LoraConfig, get_peft_model

    base = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    untrained = tmp_path / "untrained"
    peft_model.save_pretrained(untrained)  # LoRA's B starts at 0: the adapter is the base model
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    trained = tmp_path / "trained"
    peft_model.save_pretrained(trained)

    pairs = ("--pairs", data["pairs"], "--retain", data["retain"])
    zero, out = _evaluate(tmp_path, capsys, "--model_name_or_path", str(untrained), *pairs)
    assert zero["metrics"]["J"] == pytest.approx(math.log(2), abs=1e-9)
    assert "adapter disabled" in zero["reference"] and "adapter disabled" in out
    moved, _ = _evaluate(
        tmp_path, capsys, "--model_name_or_path", str(trained), "--base_model", tiny_model_path, *pairs
    )
    assert abs(moved["metrics"]["J"] - math.log(2)) > 1e-4
    assert moved["metrics"]["retain_ppl"] != pytest.approx(zero["metrics"]["retain_ppl"])
    assert 0 <= moved["metrics"]["pref_acc"] <= 1 and 0 <= moved["metrics"]["reward_acc"] <= 1


def test_local_text_classification_judge(tiny_model_path, data, tmp_path, capsys):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=tokenizer.pad_token_id,
        id2label={0: "safe", 1: "harmful"},
        label2id={"safe": 0, "harmful": 1},
    )
    torch.manual_seed(0)
    classifier = LlamaForSequenceClassification(config).eval()
    path = tmp_path / "judge"
    classifier.save_pretrained(path)
    tokenizer.save_pretrained(path)

    judge = ClassifierJudge(str(path), "harmful")
    texts = [" You are stupid.", " The capital of France is Paris."]
    with torch.no_grad():
        expected = [
            float(torch.softmax(classifier(**tokenizer(t, return_tensors="pt")).logits, -1)[0, 1]) for t in texts
        ]
    assert judge(texts) == pytest.approx(expected, abs=1e-5)
    assert ClassifierJudge(str(path), "0")(texts) == pytest.approx([1 - p for p in expected], abs=1e-5)
    with pytest.raises(ValueError, match=r"expected one of its labels \['safe', 'harmful'\]"):
        ClassifierJudge(str(path), "toxic")

    results, _ = _evaluate(
        tmp_path,
        capsys,
        *("--model_name_or_path", tiny_model_path, "--prompts", data["prompts"], *GENERATION),
        *("--judge", str(path), "--harmful_label", "harmful"),
    )
    assert results["judge"] == str(path) and 0 <= results["metrics"]["harmful_rate"] <= 1
    assert "J" not in results["metrics"] and "retain_ppl" not in results["metrics"]  # parts not given are skipped


def test_bad_input_gets_a_clear_error(tiny_model_path, data, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    no_rejected = _jsonl(tmp_path / "pairs.jsonl", [{"prompt": "a", "chosen": "b"}])
    no_completion = _jsonl(tmp_path / "retain.jsonl", [{"prompt": "a", "text": "b"}])
    model = ("--model_name_or_path", tiny_model_path, "--ref_model", tiny_model_path)
    cases = [
        ((*model,), "Nothing to evaluate"),
        ((*model, "--pairs", str(empty)), "is an empty file"),
        ((*model, "--pairs", str(tmp_path / "missing.jsonl")), "no such file"),
        ((*model, "--pairs", no_rejected), "expected preference pairs 'prompt, chosen, rejected'"),
        ((*model, "--retain", no_completion), "missing ['completion']"),
        (("--model_name_or_path", tiny_model_path, "--pairs", data["pairs"]), "pass --ref_model"),
        ((*model, "--prompts", data["prompts"], "--judge", str(tmp_path)), "neither 'lexical', 'profanity' nor"),
    ]
    for argv, message in cases:
        assert main(["evaluate", *argv]) == 2, argv
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (argv, err)
