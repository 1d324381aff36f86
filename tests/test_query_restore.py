"""The in-training query of a checkpoint is restored by parameter name and shape: a checkpoint written with another
adapter or set of target modules is refused with a clear error, not loaded onto the wrong parameters."""

import pytest
import torch
from conftest import PROMPTS, REJECTED
from datasets import Dataset
from test_refresh_controller import LoopHost, _args, loop_controller, tokenized_pairs

from trl_u2a import data as u2a_data
from trl_u2a.safe_state import load_state, save_state


def _controller(tiny_model_path, tokenizer, tmp_path, target_modules, r=4):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    lora = LoraConfig(r=r, lora_alpha=8, target_modules=target_modules, task_type="CAUSAL_LM", init_lora_weights=False)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_path), lora)
    negatives = u2a_data.tokenize_unpaired(
        u2a_data.to_unpaired(Dataset.from_dict({"prompt": PROMPTS, "completion": REJECTED})), tokenizer, 64, "negs"
    )
    host = LoopHost(model, [negatives[i] for i in range(len(negatives))], tokenizer.pad_token_id, _args(tmp_path))
    return loop_controller(host, tokenized_pairs(tokenizer), tokenizer, in_training=True)


@pytest.fixture
def saved(tiny_model_path, tokenizer, tmp_path):
    """A checkpoint's refresh state, through the safetensors + JSON files, of a LoRA on q_proj and v_proj."""
    controller = _controller(tiny_model_path, tokenizer, tmp_path / "a", ["q_proj", "v_proj"])
    controller.begin(step=0, max_steps=20)
    save_state(controller.state_dict(), str(tmp_path))
    names = {p: n for n, p in controller.host.model.named_parameters()}
    return load_state(str(tmp_path)), {names[p]: v.clone() for p, v in controller.query.items()}


def test_the_query_is_restored_by_name(tiny_model_path, tokenizer, tmp_path, saved):
    state, expected = saved
    controller = _controller(tiny_model_path, tokenizer, tmp_path / "b", ["q_proj", "v_proj"])
    controller.load_state_dict(state)
    names = {p: n for n, p in controller.host.model.named_parameters()}
    restored = {names[p]: v for p, v in controller.query.items()}
    assert restored.keys() == expected.keys()
    assert all(torch.equal(restored[n], expected[n]) for n in expected)


@pytest.mark.parametrize(
    "target_modules, r, match",
    [
        (["q_proj", "k_proj"], 4, "parameters this model lacks: .*v_proj"),  # another target-module set
        (["q_proj", "v_proj"], 8, r"other shapes: .*lora_A.*\(4, 64\) \(this model: \(8, 64\)\)"),  # another rank
    ],
)
def test_a_query_from_another_adapter_is_refused(tiny_model_path, tokenizer, tmp_path, saved, target_modules, r, match):
    state, _ = saved
    controller = _controller(tiny_model_path, tokenizer, tmp_path / "b", target_modules, r=r)
    with pytest.raises(ValueError, match=f"does not fit this model \\({match}"):
        controller.load_state_dict(state)
