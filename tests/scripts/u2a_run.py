"""A small U2A run for the multi-process and resume tests: writes the final weights and adapter to a JSON file.

Usage: python u2a_run.py MODEL_DIR OUT_JSON PER_DEVICE_BATCH [key=value ...]  (launch with accelerate for 2 processes)

`kill_at=step:N|refresh:N|save:N` sends SIGKILL to this process at that point (a real kill, for the resume tests):
at the start of optimizer step N, inside refresh N after its scores are computed, or inside the save of checkpoint N
after the U2A state and the model are written but before `trainer_state.json`.
"""

import json
import os
import signal
import sys

import torch
from accelerate import PartialState
from datasets import Dataset

sys.path.insert(0, __file__.rsplit("/", 2)[0])
from conftest import CHOSEN, PROMPTS, REJECTED

from trl_u2a import U2AConfig, U2ATrainer


def main():
    model_dir, out, batch = sys.argv[1], sys.argv[2], int(sys.argv[3])
    overrides = dict(kv.split("=", 1) for kv in sys.argv[4:])
    # 7 negatives: a number the world size 2 does not divide
    train = Dataset.from_dict({"prompt": PROMPTS + PROMPTS[:1], "completion": REJECTED + CHOSEN[:1]})
    alignment = Dataset.from_dict({"prompt": PROMPTS[:5], "chosen": CHOSEN[:5], "rejected": REJECTED[:5]})
    args = U2AConfig(
        output_dir=overrides.pop("output_dir", out + ".run"),
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        report_to="none",
        per_device_train_batch_size=batch,
        max_steps=int(overrides.pop("max_steps", 6)),
        learning_rate=5e-3,
        logging_steps=1,
        max_length=64,
        seed=0,
        loss_type=overrides.pop("loss_type", "npo"),
        budget=4,
        pool_size=2,
        reweight_steps=2,
        reweight_warmup_steps=0,
        preconditioner=overrides.pop("preconditioner", "adam"),
        save_strategy=overrides.pop("save_strategy", "no"),
        save_steps=int(overrides.pop("save_steps", 500)),
        disable_tqdm=True,
    )
    resume = overrides.pop("resume", None)
    resume = True if resume == "true" else resume
    kill_at = overrides.pop("kill_at", None)
    assert not overrides, f"unknown overrides {overrides}"
    trainer = U2ATrainer(model=model_dir, args=args, train_dataset=train, alignment_dataset=alignment)
    if kill_at:
        install_kill(trainer, *kill_at.split(":"))
    trainer.train(resume_from_checkpoint=resume)
    state = PartialState()
    if state.is_main_process:
        params = {n: p.detach().flatten().tolist() for n, p in trainer.model.named_parameters() if p.requires_grad}
        result = {
            "distributed_type": str(state.distributed_type),
            "num_processes": state.num_processes,
            "backend": state.backend,
            "weights": trainer.weight_state.weights.tolist(),
            "selected_history": [r.get("n_selected") for r in trainer.refresh_callback.history],
            "objective": [r["objective"] for r in trainer.refresh_callback.history],
            "params": params,
        }
        with open(out, "w") as f:
            json.dump(result, f)
    torch.distributed.barrier() if torch.distributed.is_initialized() else None


def install_kill(trainer, where: str, n: str) -> None:
    n = int(n)

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    if where == "step":
        from transformers import TrainerCallback

        class Kill(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                if state.global_step + 1 == n:
                    die()

        trainer.add_callback(Kill())
    elif where == "refresh":
        import trl_u2a.refresh.controller as callback

        original = callback.refresh_weights

        def refresh_weights(*args, **kwargs):
            if trainer.refresh_callback.controller.refresh_index == n:
                die()
            return original(*args, **kwargs)

        callback.refresh_weights = refresh_weights
    elif where == "save":
        original = trainer._save_rng_state

        def save_rng_state(output_dir):
            original(output_dir)
            if trainer.state.global_step == n:
                die()

        trainer._save_rng_state = save_rng_state
    else:
        raise ValueError(f"kill_at={where}:{n}")


if __name__ == "__main__":
    main()
