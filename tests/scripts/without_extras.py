"""The core install without its extras: train, plot and score with matplotlib, alt-profanity-check and bitsandbytes
unimportable, then ask for the demo. Prints one JSON line of what happened.

Usage: python without_extras.py MODEL_DIR OUTPUT_DIR
"""

import sys

BLOCKED = ("matplotlib", "profanity_check", "bitsandbytes")


class BlockExtras:
    """A `sys.meta_path` finder that refuses the blocked packages and their submodules.

    The top-level names are also set to None in `sys.modules`, as Python does for a package that is not installed:
    `import` then raises ModuleNotFoundError and `importlib.util.find_spec` returns None (the availability probes of
    transformers and peft call it, and an exception there would be this test's artefact, not a missing package)."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked: an extra)", name=name)
        return None


sys.meta_path.insert(0, BlockExtras())
for blocked in BLOCKED:
    sys.modules[blocked] = None

import contextlib  # noqa: E402 (after the blocker, so that nothing below can import an extra)
import io  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import warnings  # noqa: E402

sys.path.insert(0, __file__.rsplit("/", 2)[0])
from conftest import CHOSEN, PROMPTS, REJECTED  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from trl_u2a import U2AConfig, U2ATrainer, score_negatives  # noqa: E402
from trl_u2a.cli import main as cli_main  # noqa: E402
from trl_u2a.testing import cpu_training_args  # noqa: E402


def main():
    model_dir, out = sys.argv[1], sys.argv[2]
    negatives = Dataset.from_dict({"prompt": PROMPTS, "completion": REJECTED})
    alignment = Dataset.from_dict({"prompt": PROMPTS, "chosen": CHOSEN, "rejected": REJECTED})
    args = cpu_training_args(
        U2AConfig,
        output_dir=out,
        per_device_train_batch_size=3,
        max_steps=3,
        learning_rate=1e-3,
        max_length=64,
        reweight_steps=1,
        reweight_warmup_steps=0,
        budget=0.5,
        save_refresh_plots=True,
    )
    trainer = U2ATrainer(model=model_dir, args=args, train_dataset=negatives, alignment_dataset=alignment)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    plot_warnings = [str(w.message) for w in caught if "matplotlib is not installed" in str(w.message)]

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    scores = score_negatives(model, tokenizer, negatives, alignment, max_length=64)

    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        demo_rc = cli_main(["demo", "--quick", "--output_dir", os.path.join(out, "demo")])
    print(
        json.dumps(
            {
                "refreshes": len(trainer.refresh_callback.history),
                "plot_warnings": plot_warnings,
                "plots_dir": os.path.exists(os.path.join(out, "u2a_plots")),
                "scores": list(scores["score"]),
                "demo_rc": demo_rc,
                "demo_stderr": stderr.getvalue(),
                "demo_output": os.path.exists(os.path.join(out, "demo")),
                "imported": sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED and sys.modules[m] is not None),
            }
        )
    )


if __name__ == "__main__":
    main()
