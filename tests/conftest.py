"""Shared fixtures: one offline tiny model per test session, small datasets in every accepted format."""

import os

import pytest

from trl_u2a.testing import cpu_training_args, use_offline_environment

use_offline_environment()
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402 (after the environment: torch and transformers read it at import)

# The models here are tiny: a second thread only adds synchronisation, and it oversubscribes the cores when
# multi-process tests run beside the test process
torch.set_num_threads(1)

PROMPTS = [
    "How do I bake bread?",
    "What is the capital of France?",
    "Tell me a joke.",
    "How can I learn to code?",
    "Give me a tip for gardening.",
    "How do I save money?",
]
CHOSEN = [
    " Mix flour, water, salt and yeast, knead it and bake it.",
    " The capital of France is Paris.",
    " Why did the chicken cross the road? To get to the other side.",
    " Start with small projects and practice every day.",
    " Water your plants early in the morning.",
    " Set a budget and put a little aside every month.",
]
REJECTED = [
    " You are stupid, bake it yourself.",
    " Shut up, idiot.",
    " No.",
    " Coding is for losers, give up now you fool.",
    " Who cares about plants.",
    " Steal it, moron.",
]


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory):
    from trl_u2a.testing import save_tiny_model

    # hidden_size 64: bitsandbytes 4-bit on CPU quantizes in blocks of 64 input features
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"), corpus=PROMPTS + CHOSEN + REJECTED, hidden_size=64)


@pytest.fixture(scope="session")
def tokenizer(tiny_model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_path)


@pytest.fixture
def preference_dataset():
    from datasets import Dataset

    return Dataset.from_dict({"prompt": PROMPTS, "chosen": CHOSEN, "rejected": REJECTED})


@pytest.fixture
def unpaired_dataset():
    from datasets import Dataset

    return Dataset.from_dict(
        {"prompt": PROMPTS + PROMPTS, "completion": REJECTED + CHOSEN, "label": [False] * 6 + [True] * 6}
    )


@pytest.fixture
def conversational_preference_dataset():
    from datasets import Dataset

    return Dataset.from_dict(
        {
            "prompt": [[{"role": "user", "content": p}] for p in PROMPTS],
            "chosen": [[{"role": "assistant", "content": c}] for c in CHOSEN],
            "rejected": [[{"role": "assistant", "content": r}] for r in REJECTED],
        }
    )


def cpu_args(tmp_path, **overrides):
    """A U2AConfig sized for a CPU test: fp32, no checkpointing, no saving, no reporting."""
    from trl_u2a import U2AConfig

    defaults = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        max_steps=3,
        learning_rate=1e-3,
        logging_steps=1,
        max_length=64,
        seed=0,
        # Mechanism tests count refreshes from step 0; the warm-up default has its own test
        reweight_warmup_steps=0,
    )
    defaults.update(overrides)
    return cpu_training_args(U2AConfig, **defaults)
