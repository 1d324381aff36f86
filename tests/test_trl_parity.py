"""Drop-in parity with TRL's dataset preparation: for the same rows, U2A's token ids equal those of `trl.KTOTrainer`
(negatives and retain rows) and `trl.DPOTrainer` (alignment pairs).

Both sides run their real preparation code; TRL's `_prepare_dataset` is called on a stand-in trainer holding only the
attributes it reads, so no model is built. The tokenizer is Llama-style: it adds BOS to plain text and its chat
template writes BOS itself, renders tools, tool calls, typed text parts and a template option.
"""

import json
from types import SimpleNamespace

import pytest
from datasets import Dataset
from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer

from trl_u2a import data as u2a_data
from trl_u2a.testing import build_tokenizer, cpu_training_args

TEMPLATE = (
    "{{ bos_token }}"
    "{% if persona %}Persona: {{ persona }}\n{% endif %}"
    "{% if tools %}Tools: {{ tools | tojson }}\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.content is string %}{{ m.content }}"
    "{% elif m.content %}{% for p in m.content %}{{ p.text }}{% endfor %}{% endif %}"
    "{% if m.tool_calls %}{% for c in m.tool_calls %}<call>{{ c.function.name }} {{ c.function.arguments | tojson }}"
    "</call>{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


@pytest.fixture(scope="module")
def llama_tokenizer():
    """BOS added to plain text by the tokenizer (as Llama, Gemma and Mistral do), and written by the chat template."""
    from tokenizers import processors

    tokenizer = build_tokenizer(["Paris weather city get_weather persona tools"])
    tokenizer.add_special_tokens({"bos_token": "<s>"})
    bos = tokenizer.bos_token_id
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    tokenizer.chat_template = TEMPLATE
    assert tokenizer("hi")["input_ids"][0] == bos
    return tokenizer


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def kto_ids(tokenizer, dataset):
    trainer = SimpleNamespace(_tokenizer=tokenizer, calculate_KL=False)
    args = cpu_training_args(KTOConfig, output_dir="unused", max_length=None)
    out = KTOTrainer._prepare_dataset(trainer, dataset, tokenizer, args, "eval")
    return out["prompt_ids"], out["completion_ids"]


def u2a_ids(tokenizer, dataset):
    out = u2a_data.tokenize_unpaired(u2a_data.to_unpaired(dataset), tokenizer, None, "train_dataset")
    return out["prompt_ids"], out["completion_ids"]


def dpo_ids(tokenizer, dataset):
    trainer = SimpleNamespace(_tokenizer=tokenizer)
    args = cpu_training_args(DPOConfig, output_dir="unused", max_length=None)
    out = DPOTrainer._prepare_dataset(trainer, dataset, tokenizer, args, "eval")
    return out["prompt_ids"], out["chosen_ids"], out["rejected_ids"]


def u2a_pair_ids(tokenizer, dataset):
    out = u2a_data.tokenize_pairs(u2a_data.check_preference(dataset), tokenizer, None, "alignment_dataset")
    return out["prompt_ids"], out["chosen_ids"], out["rejected_ids"]


UNPAIRED_ROWS = {
    "plain text": [
        {"prompt": "What is the capital of France?", "completion": " Paris.", "label": False},
        {"prompt": "Tell me a joke.", "completion": " No.", "label": True},
    ],
    "system prompt and several turns": [
        {
            "prompt": [
                {"role": "system", "content": "You are terse."},
                user("Hi"),
                assistant("Hello."),
                user("Capital of France?"),
            ],
            "completion": [assistant("Paris, idiot.")],
            "label": False,
        },
        {
            "prompt": [{"role": "system", "content": "Be kind."}, user("Joke?"), assistant("Sure."), user("Go")],
            "completion": [assistant("Why did the chicken cross the road?")],
            "label": True,
        },
    ],
    "tools and chat_template_kwargs columns": [
        {
            "prompt": [user("Weather in Paris?")],
            "completion": [assistant("Look outside.")],
            "label": False,
            "tools": [WEATHER_TOOL],
            "chat_template_kwargs": {"persona": "pirate"},
        },
        {
            "prompt": [user("Weather in Rome?")],
            "completion": [assistant("Sunny.")],
            "label": True,
            "tools": [WEATHER_TOOL],
            "chat_template_kwargs": {"persona": "sailor"},
        },
    ],
    "tools as JSON text": [
        {
            "prompt": [user("Weather in Paris?")],
            "completion": [assistant("Look outside.")],
            "label": False,
            "tools": json.dumps([WEATHER_TOOL]),
        }
    ],
    "assistant tool calls": [
        {
            "prompt": [user("Weather in Paris?")],
            "completion": [
                {
                    "role": "assistant",
                    "content": "",
                    "tool_calls": [
                        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
                    ],
                }
            ],
            "label": False,
            "tools": [WEATHER_TOOL],
        }
    ],
    "text given as typed parts": [
        {
            "prompt": [{"role": "user", "content": [{"type": "text", "text": "Capital of France?"}]}],
            "completion": [{"role": "assistant", "content": [{"type": "text", "text": "Paris, idiot."}]}],
            "label": False,
        }
    ],
}


@pytest.mark.parametrize("case", list(UNPAIRED_ROWS))
def test_unpaired_ids_equal_kto(llama_tokenizer, case):
    dataset = Dataset.from_list(UNPAIRED_ROWS[case])
    kto_prompts, kto_completions = kto_ids(llama_tokenizer, dataset)
    prompts, completions = u2a_ids(llama_tokenizer, dataset)
    assert prompts == kto_prompts
    assert completions == kto_completions
    bos = llama_tokenizer.bos_token_id
    for ids in prompts:
        # BOS first, once: added by the tokenizer on plain text, written by the template on conversations
        assert ids[0] == bos and ids.count(bos) == 1


def test_row_options_reach_the_template(llama_tokenizer):
    """The `tools` and `chat_template_kwargs` columns change the prompt (not only equal KTO's by both ignoring them)."""
    rows = UNPAIRED_ROWS["tools and chat_template_kwargs columns"]
    prompts, _ = u2a_ids(llama_tokenizer, Dataset.from_list(rows))
    text = llama_tokenizer.decode(prompts[0])
    assert "Persona: pirate" in text and "get_weather" in text
    bare, _ = u2a_ids(llama_tokenizer, Dataset.from_list([{k: rows[0][k] for k in ("prompt", "completion", "label")}]))
    assert bare[0] != prompts[0]


PAIR_ROWS = {
    "plain text": [
        {"prompt": "What is the capital of France?", "chosen": " Paris.", "rejected": " Shut up."},
        {"prompt": "Tell me a joke.", "chosen": " Why did the chicken cross the road?", "rejected": " No."},
    ],
    "implicit prompt, several turns": [
        {
            "chosen": [{"role": "system", "content": "Be kind."}, user("Hi"), assistant("Hello.")],
            "rejected": [{"role": "system", "content": "Be kind."}, user("Hi"), assistant("Go away.")],
        }
    ],
    "tools and chat_template_kwargs columns": [
        {
            "prompt": [user("Weather in Paris?")],
            "chosen": [assistant("Let me check.")],
            "rejected": [assistant("Look outside, fool.")],
            "tools": [WEATHER_TOOL],
            "chat_template_kwargs": {"persona": "pirate"},
        }
    ],
}


@pytest.mark.parametrize("case", list(PAIR_ROWS))
def test_alignment_pair_ids_equal_dpo(llama_tokenizer, case):
    dataset = Dataset.from_list(PAIR_ROWS[case])
    assert u2a_pair_ids(llama_tokenizer, dataset) == dpo_ids(llama_tokenizer, dataset)


def test_evaluation_tokenizes_as_the_trainer(llama_tokenizer):
    """`trl-u2a evaluate` scores rows with the same ids as training (BOS included on plain text)."""
    prompt_ids, completion_ids = u2a_data.tokenize_prompt_completion(llama_tokenizer, "Capital of France?", " Paris.")
    kto_prompts, kto_completions = kto_ids(
        llama_tokenizer, Dataset.from_list([{"prompt": "Capital of France?", "completion": " Paris.", "label": False}])
    )
    assert (prompt_ids, completion_ids) == (kto_prompts[0], kto_completions[0])


def test_image_parts_are_refused(llama_tokenizer):
    rows = [
        {
            "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}],
            "completion": [{"role": "assistant", "content": [{"type": "text", "text": "A cat."}]}],
        }
    ]
    with pytest.raises(ValueError, match=r"column 'prompt' row 0 has a content part of type 'image'; U2A is text-only"):
        u2a_data.to_unpaired(Dataset.from_list(rows))


def test_image_column_is_refused():
    rows = [{"prompt": "What is this?", "completion": " A cat.", "images": ["cat.png"]}]
    with pytest.raises(ValueError, match=r"train_dataset has an 'images' column; U2A is text-only"):
        u2a_data.to_unpaired(Dataset.from_list(rows))


def test_tool_call_turn_is_not_blank_but_an_empty_turn_is():
    call = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    rows = [
        {"prompt": [user("Weather?")], "completion": [{"role": "assistant", "content": "", "tool_calls": [call]}]},
        {"prompt": [user("Weather?")], "completion": [{"role": "assistant", "content": " ", "tool_calls": None}]},
    ]
    with pytest.raises(ValueError, match=r"column 'completion' is empty or whitespace-only at row 1:"):
        u2a_data.to_unpaired(Dataset.from_list(rows))
    assert len(u2a_data.to_unpaired(Dataset.from_list(rows[:1]))) == 1
