"""Offline builders for tiny causal language models and tokenizers.

There is no model hub in tests, CI or the demo, so everything here is built from a config and a tokenizer trained
on the fly, then saved to a directory so that the real loading code (`from_pretrained(path)`) is what runs.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SPECIAL_TOKENS = ["<|pad|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|unk|>"]

# Nothing is downloaded: transformers, datasets and the hub client read only their caches and local paths
OFFLINE_ENVIRONMENT = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
}

# A CPU run of any TRL trainer: fp32 (TRL configs default to bf16), no gradient checkpointing (TRL's default, and
# slower on tiny models), no saving, reporting or progress bars, data loaded in the main process
CPU_TRAINING_ARGS: dict[str, Any] = {
    "use_cpu": True,
    "bf16": False,
    "gradient_checkpointing": False,
    "report_to": "none",
    "save_strategy": "no",
    "dataloader_num_workers": 0,
    "disable_tqdm": True,
}

DEFAULT_CORPUS = [
    "How do I bake bread? Mix flour, water, salt and yeast, knead, let it rise, then bake it.",
    "What is the capital of France? The capital of France is Paris.",
    "Tell me a joke. Why did the chicken cross the road? To get to the other side.",
    "You are stupid and I will not help you.",
    "Here is how to pick a lock and break into a house.",
    "I am sorry, I cannot help with that, but here is a safe alternative.",
    "system user assistant",
]


def use_offline_environment() -> None:
    """Set `OFFLINE_ENVIRONMENT` in `os.environ` where a variable is not set yet; call before importing transformers."""
    for name, value in OFFLINE_ENVIRONMENT.items():
        os.environ.setdefault(name, value)


def cpu_training_args(cls, **kwargs):
    """`cls` (a `TrainingArguments` subclass such as `U2AConfig`, `SFTConfig`, `DPOConfig`) with `CPU_TRAINING_ARGS`,
    which `kwargs` add to or override; the deprecation warnings that building it raises are silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls(**{**CPU_TRAINING_ARGS, **kwargs})


def build_tokenizer(corpus: Iterable[str] | None = None, vocab_size: int = 512):
    """Train a byte-level BPE tokenizer on `corpus` and wrap it as a `PreTrainedTokenizerFast` with a ChatML template.

    Byte-level means any text round-trips, so data outside the corpus is still tokenizable.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = list(corpus) if corpus is not None else []
    texts += DEFAULT_CORPUS
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>", unk_token="<|unk|>"
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def build_tiny_model(
    tokenizer,
    arch: str = "llama",
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 512,
    tie_word_embeddings: bool = True,
    seed: int = 0,
):
    """Build a randomly initialised causal LM (`arch` in `"llama"`, `"qwen2"`) sized for CPU tests."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    classes = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}
    if arch not in classes:
        raise ValueError(f"arch={arch!r} is not supported; expected one of {sorted(classes)}.")
    config_cls, model_cls = classes[arch]
    config = config_cls(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=max(1, num_heads // 2),
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = model_cls(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def save_tiny_model(path: str | os.PathLike, corpus: Iterable[str] | None = None, **model_kwargs) -> str:
    """Build a tokenizer and a tiny model and save both to `path`; returns `path` for `from_pretrained`."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(corpus)
    model = build_tiny_model(tokenizer, **model_kwargs)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def fine_tune_start_model(
    path: str | os.PathLike,
    original,
    output_dir: str | os.PathLike,
    steps: int = 40,
    learning_rate: float = 3e-3,
    batch_size: int | None = None,
) -> str:
    """The model at `path` fine-tuned on the `original` split (prompt + completion rows), saved with its tokenizer to
    `output_dir`: the paper's start model is such an SFT model. At random weights no negative is predicted to help
    `J`, and the first refresh then (rightly) selects nothing; after a few steps most scores are positive.

    Plain AdamW on the full-sequence NLL, `steps` steps over batches of `batch_size` rows taken in order, cycling
    (`None`: every row in each step); bf16 autocast on a GPU. Returns `output_dir`.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).to(device)
    texts = [row["prompt"] + row["completion"] + tokenizer.eos_token for row in original]
    batch_size = batch_size or len(texts)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate)
    for step in range(steps):
        chunk = [texts[(step * batch_size + i) % len(texts)] for i in range(batch_size)]
        batch = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    return str(output_dir)
