"""A small U2A run for the multi-process and resume tests: writes the final weights and adapter to a JSON file.

Usage: python u2a_run.py MODEL_DIR OUT_JSON PER_DEVICE_BATCH [key=value ...]  (launch with accelerate for 2 processes)

`kill_at=step:N|refresh:N|save:N|before_refresh:N` sends SIGKILL to this process at that point (a real kill, for the
resume tests): at the start of optimizer step N, inside refresh N after its scores are computed, inside the save of
checkpoint N after the U2A state and the model are written but before this rank's RNG state (and before the barrier
after which the main process marks the checkpoint complete),
or at the end of step N before the refresh due then starts (the other ranks then wait in that refresh's first
collective).
`signal=STOP` freezes the process there instead (a stuck device or data loader), and `fault_rank=R` limits the fault to
rank R. `nan_at=N` gives rank `fault_rank` (default 1) a poisoned batch at optimizer step N (a NaN reference log-prob).

Every rank writes `OUT_JSON.rank<i>.json` (its pid and the world size it sees) once its trainer is built, and
`OUT_JSON.rank<i>.error.json` (the time and the error) when it fails.
"""

import json
import os
import signal
import sys
import time

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
    negatives = int(overrides.pop("negatives", 7))
    train = Dataset.from_dict(
        {"prompt": (PROMPTS + PROMPTS[:1])[:negatives], "completion": (REJECTED + CHOSEN[:1])[:negatives]}
    )
    pairs = int(overrides.pop("pairs", 5))
    alignment = Dataset.from_dict({"prompt": PROMPTS[:pairs], "chosen": CHOSEN[:pairs], "rejected": REJECTED[:pairs]})
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
        budget=json.loads(overrides.pop("budget", "4")),  # a fraction in (0, 1] or a count above 1
        pool_size=int(overrides.pop("pool_size", 2)),
        reweight_steps=2,
        reweight_warmup_steps=0,
        preconditioner=overrides.pop("preconditioner", "adam"),
        save_strategy=overrides.pop("save_strategy", "no"),
        save_steps=int(overrides.pop("save_steps", 500)),
        ddp_timeout=int(overrides.pop("ddp_timeout", 1800)),
        disable_tqdm=True,
    )
    resume = overrides.pop("resume", None)
    resume = True if resume == "true" else resume
    kill_at = overrides.pop("kill_at", None)
    nan_at = overrides.pop("nan_at", None)
    sig = getattr(signal, "SIG" + overrides.pop("signal", "KILL"))
    fault_rank = overrides.pop("fault_rank", None)
    assert not overrides, f"unknown overrides {overrides}"
    trainer = U2ATrainer(model=model_dir, args=args, train_dataset=train, alignment_dataset=alignment)
    state = PartialState()
    with open(f"{out}.rank{state.process_index}.json", "w") as f:
        json.dump({"pid": os.getpid(), "num_processes": state.num_processes, "backend": state.backend}, f)
    faulty = fault_rank is None or int(fault_rank) == state.process_index
    if kill_at and faulty:
        install_kill(trainer, *kill_at.split(":"), sig=sig, note=f"{out}.fault")
    if nan_at and state.process_index == int(fault_rank or 1):
        install_nan(trainer, int(nan_at))
    try:
        trainer.train(resume_from_checkpoint=resume)
    except BaseException as error:
        with open(f"{out}.rank{state.process_index}.error.json", "w") as f:
            json.dump({"time": time.time(), "error": f"{type(error).__name__}: {error}"}, f)
        raise
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
    # As the CLI ends: every rank past its last collective, then the process group destroyed
    trainer.accelerator.wait_for_everyone()
    trainer.end()


def install_kill(trainer, where: str, n: str, sig=signal.SIGKILL, note: str | None = None) -> None:
    n = int(n)

    def die():
        if note:  # when the fault struck, for the test to time the other ranks' exit
            with open(note, "w") as f:
                f.write(str(time.time()))
        os.kill(os.getpid(), sig)

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
            if trainer.state.global_step == n:
                die()
            original(output_dir)

        trainer._save_rng_state = save_rng_state
    elif where == "before_refresh":
        from transformers import TrainerCallback

        class Freeze(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step == n:
                    die()

        # Ahead of the refresh callback, so that the other ranks are inside the refresh when this one stops
        trainer.callback_handler.callbacks.insert(0, Freeze())
    else:
        raise ValueError(f"kill_at={where}:{n}")


def install_nan(trainer, step: int) -> None:
    """This rank's batch of optimizer step `step` gets a NaN reference log-prob (NPO), as a corrupt row would."""
    original = trainer.training_step

    def training_step(model, inputs, *args, **kwargs):
        if trainer.state.global_step + 1 == step:
            inputs = {**inputs, "ref_logps": torch.full_like(inputs["ref_logps"], float("nan"))}
        return original(model, inputs, *args, **kwargs)

    trainer.training_step = training_step


if __name__ == "__main__":
    main()
    # The run is over and its results are written: leave without the interpreter's teardown of native objects, in
    # which a gloo rank on a CPU rarely aborts (`terminate called without an active exception`, SIGABRT, after
    # training and saving: once in a fresh-clone CI run). A failing run still exits the usual way.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
