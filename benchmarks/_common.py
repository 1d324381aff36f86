"""Shared pieces of the benchmark scripts: model presets, synthetic text data of exact token lengths, machine facts,
and a round-robin scheduler that interleaves whole `Trainer.train()` runs step by step.

Not a module of the package: the scripts import it as a sibling (`python benchmarks/<script>.py`).
"""

from __future__ import annotations

import os
import platform
import random
import re
import subprocess
import threading
import time
from pathlib import Path

from trl_u2a.testing import use_offline_environment

# Model presets, all randomly initialised from a config (no hub). `tiny` is the offline test model (tests/conftest.py),
# `bench20m` the ~19M-parameter CPU benchmark model of bench_scoring.py, `qwen0.5b` the shape of Qwen2.5-0.5B (494M
# parameters with its 151,936-token vocabulary), `llama1b` the shape of Llama-3.2-1B with a 32,000-token vocabulary.
PRESETS = {
    "tiny": dict(arch="llama", hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128),
    "bench20m": dict(arch="llama", hidden_size=512, num_layers=6, num_heads=8, intermediate_size=1536),
    "qwen0.5b": dict(
        arch="qwen2",
        hidden_size=896,
        num_layers=24,
        num_heads=14,
        num_kv_heads=2,
        intermediate_size=4864,
        vocab_size=151936,
    ),
    "llama1b": dict(
        arch="llama",
        hidden_size=2048,
        num_layers=16,
        num_heads=32,
        num_kv_heads=8,
        intermediate_size=8192,
        vocab_size=32000,
    ),
}

WORDS = re.findall(
    r"[a-z]+",
    "how do i bake bread mix flour water salt and yeast knead let it rise then bake what is the capital of france "
    "paris tell me a joke why did the chicken cross the road to get to other side you are stupid will not help here "
    "pick lock break into house am sorry cannot with that but safe alternative system user assistant start small "
    "projects practice every day plants early morning set budget put little aside month give up fool shut idiot",
)


def set_threads(threads: int) -> None:
    """Call before importing torch: OpenMP reads OMP_NUM_THREADS once, and new threads inherit it (not the value of
    `torch.set_num_threads` in the main thread)."""
    os.environ["OMP_NUM_THREADS"] = str(threads)
    os.environ["MKL_NUM_THREADS"] = str(threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TQDM_DISABLE", "1")
    use_offline_environment()


def lora_config(rank: int = 16, task_type: str | None = "CAUSAL_LM"):
    """The LoRA of every benchmark: rank `rank`, alpha `2 rank`, every linear layer, no dropout."""
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear", lora_dropout=0.0, task_type=task_type)


def lora_scoring_setup(model, rank: int, generator):
    """`model` with `lora_config(rank)` and non-zero `lora_B` (as after some training; PEFT starts at B = 0), its
    tracked parameters and a random query `v` over them, drawn from `generator`: `(model, params, v)`."""
    import torch
    from peft import get_peft_model

    from trl_u2a import influence

    model = get_peft_model(model, lora_config(rank, task_type=None))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_((torch.randn(p.shape, generator=generator) * 0.01).to(p))
    params = influence.tracked_parameters(model)
    v = {p: torch.randn(p.shape, generator=generator).to(p.device) for p in params}
    return model, params, v


def random_batches(n: int, batch_size: int, seq_len: int, vocab: int, generator, device="cpu") -> list[dict]:
    """`n // batch_size` batches of random token ids (the special tokens 0-4 skipped), each row with a random prompt
    of 1/8 to 1/2 of `seq_len` masked out of the completion: `input_ids`, `attention_mask`, `completion_mask`."""
    import torch

    batches = []
    for _ in range(n // batch_size):
        input_ids = torch.randint(5, vocab, (batch_size, seq_len), generator=generator)
        prompt_len = torch.randint(seq_len // 8, seq_len // 2, (batch_size, 1), generator=generator)
        completion_mask = (torch.arange(seq_len)[None, :] >= prompt_len).long()
        batches.append(
            {
                "input_ids": input_ids.to(device),
                "attention_mask": torch.ones_like(input_ids).to(device),
                "completion_mask": completion_mask.to(device),
            }
        )
    return batches


def training_kwargs(output_dir: str, batch_size: int, seq_len: int, use_cpu: bool = True, bf16: bool = False, **extra):
    """Trainer arguments every benchmark shares (no checkpointing, saving, reporting or progress bars; seed 0), plus
    `extra`."""
    return dict(
        output_dir=output_dir,
        use_cpu=use_cpu,
        bf16=bf16,
        gradient_checkpointing=False,
        report_to="none",
        save_strategy="no",
        per_device_train_batch_size=batch_size,
        max_length=seq_len,
        seed=0,
        disable_tqdm=True,
        **extra,
    )


def save_model(preset: str, root: str, dtype: str = "float32") -> str:
    """Build the tokenizer and the preset model from a config and save both under `root/preset`; reuse if present."""
    path = Path(root) / preset
    if (path / "config.json").exists():
        return str(path)
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from trl_u2a.testing import build_tiny_model, build_tokenizer

    spec = dict(PRESETS[preset])
    tokenizer = build_tokenizer()
    if "vocab_size" not in spec:
        model = build_tiny_model(
            tokenizer,
            arch=spec["arch"],
            hidden_size=spec["hidden_size"],
            num_layers=spec["num_layers"],
            num_heads=spec["num_heads"],
            intermediate_size=spec["intermediate_size"],
            max_position_embeddings=1024,
            tie_word_embeddings=True,
        )
    else:
        # A realistic vocabulary (the LM head is a large share of a small model's cost); the tiny tokenizer only uses
        # its first few hundred ids.
        config_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[
            spec["arch"]
        ]
        config = config_cls(
            vocab_size=spec["vocab_size"],
            hidden_size=spec["hidden_size"],
            intermediate_size=spec["intermediate_size"],
            num_hidden_layers=spec["num_layers"],
            num_attention_heads=spec["num_heads"],
            num_key_value_heads=spec["num_kv_heads"],
            max_position_embeddings=4096,
            tie_word_embeddings=True,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=None,
            torch_dtype=dtype,
        )
        torch.manual_seed(0)
        with torch.device("cpu"):
            model = model_cls(config).to(getattr(torch, dtype))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def model_params(path: str) -> int:
    """Parameter count from the saved config (no weights loaded)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def _text(tokenizer, rng: random.Random, min_tokens: int, prefix: str = "") -> str:
    """Random words appended to `prefix`, the fewest that make the text (after `prefix`) `min_tokens` tokens long."""

    def length(words):
        full = tokenizer(prefix + " " + " ".join(words), add_special_tokens=False)["input_ids"]
        return len(full) - len(tokenizer(prefix, add_special_tokens=False)["input_ids"])

    words = []
    while not words or length(words) < min_tokens:
        words += [rng.choice(WORDS) for _ in range(16)]
    while len(words) > 1 and length(words[:-1]) >= min_tokens:
        words.pop()
    return " " + " ".join(words)


def make_data(tokenizer, seq_len: int, n_negatives: int, n_retain: int, n_pairs: int, seed: int = 0) -> dict:
    """Synthetic data whose every row reaches `seq_len` tokens, so that with `max_length=seq_len` every batch of every
    trainer has exactly `(B, seq_len)` shapes. Prompts take 1/8 to 1/2 of the tokens, as in bench_scoring.py.

    Returns `unpaired` (`prompt, completion, label`: `n_negatives` rows with label False, then `n_retain` True),
    `sft` (`prompt, completion`, the same rows) and `pairs` (`prompt, chosen, rejected`, `n_pairs` rows).
    """
    from datasets import Dataset

    rng = random.Random(seed)

    def row():
        prompt = _text(tokenizer, rng, rng.randint(seq_len // 8, seq_len // 2 - 4)).strip()
        prompt_len = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        return prompt, _text(tokenizer, rng, seq_len - prompt_len + 4, prefix=prompt)

    rows = [row() for _ in range(n_negatives + n_retain)]
    unpaired = {
        "prompt": [p for p, _ in rows],
        "completion": [c for _, c in rows],
        "label": [False] * n_negatives + [True] * n_retain,
    }
    pairs = {"prompt": [], "chosen": [], "rejected": []}
    for _ in range(n_pairs):
        prompt, chosen = row()
        pairs["prompt"].append(prompt)
        pairs["chosen"].append(chosen)
        pairs["rejected"].append(_text(tokenizer, rng, seq_len, prefix=prompt))
    return {
        "unpaired": Dataset.from_dict(unpaired),
        "sft": Dataset.from_dict({"prompt": unpaired["prompt"], "completion": unpaired["completion"]}),
        "pairs": Dataset.from_dict(pairs),
    }


def machine_info() -> dict:
    """Facts to print next to the figures: CPU, cores, load average, library versions."""
    info = {
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "loadavg": list(os.getloadavg()),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }
    try:
        info["lscpu"] = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout.splitlines()[:10]
    except OSError:
        pass
    try:
        info["nvidia_smi"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            check=False,
            timeout=30,
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    import accelerate
    import peft
    import torch
    import transformers
    import trl

    info.update(
        torch=torch.__version__,
        transformers=transformers.__version__,
        trl=trl.__version__,
        peft=peft.__version__,
        accelerate=accelerate.__version__,
    )
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    info["code"] = code_version()
    return info


def code_version() -> dict:
    """Which trl_u2a ran: its path and commit (a `COMMIT` file next to a snapshot of the package made with
    `git archive`, or `git rev-parse` plus whether the package has uncommitted changes)."""
    import trl_u2a

    root = Path(trl_u2a.__file__).resolve().parent.parent
    out = {"path": str(root)}
    if (root / "COMMIT").exists():
        out["commit"] = (root / "COMMIT").read_text().strip()
        out["snapshot"] = True
        return out
    try:
        git = ["git", "-C", str(root)]
        out["commit"] = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run([*git, "status", "--porcelain", "trl_u2a"], capture_output=True, text=True).stdout
        out["uncommitted_changes"] = bool(dirty.strip())
    except OSError:
        pass
    return out


class RoundRobin:
    """Lets several threads run one at a time, in turns: `acquire(name)` blocks until it is `name`'s turn,
    `release(name)` hands the turn to the next unfinished thread. With one torch thread per run, this interleaves
    whole `Trainer.train()` runs step by step inside one process, so that load from other processes on a shared
    machine hits every run alike; a run's time is the sum of its turns. Round `r` visits the names rotated by `r`, so
    that no run always follows the same other run (whose caches it would inherit).
    """

    def __init__(self, names):
        self.names = list(names)
        self.round = 0
        self.pos = 0
        self.finished: set[str] = set()
        self.cond = threading.Condition()

    def _current(self) -> str:
        k = len(self.names)
        return self.names[(self.round + self.pos) % k]

    def acquire(self, name: str) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self._current() == name)

    def _advance(self) -> None:
        for _ in range(2 * len(self.names)):
            self.pos += 1
            if self.pos == len(self.names):
                self.round, self.pos = self.round + 1, 0
            if self._current() not in self.finished:
                return

    def release(self, name: str) -> None:
        with self.cond:
            if self._current() == name:
                self._advance()
            self.cond.notify_all()

    def finish(self, name: str) -> None:
        with self.cond:
            self.finished.add(name)
            if self._current() == name and len(self.finished) < len(self.names):
                self._advance()
            self.cond.notify_all()


class Clock:
    """Wall (`perf_counter`) and CPU (`process_time`) time of a segment."""

    def __init__(self):
        self.start()

    def start(self) -> None:
        self.wall0, self.cpu0 = time.perf_counter(), time.process_time()

    def read(self) -> tuple[float, float]:
        return time.perf_counter() - self.wall0, time.process_time() - self.cpu0


def median(values):
    values = sorted(values)
    if not values:
        return float("nan")
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else 0.5 * (values[mid - 1] + values[mid])
