"""Faults on two real CPU processes (gloo, DDP): a rank frozen or killed, a NaN on one rank, a checkpoint that cannot be
written, unequal data per rank. Each ends every rank within a bounded time, and a resume continues to the result of an
uninterrupted run.

The multi-process tests launch `tests/scripts/u2a_run.py` with `accelerate launch --config_file
recipes/accelerate/cpu_ddp.yaml`. CI runs a representative fault of each kind; `U2A_FAULT_MATRIX=1` runs every
(fault, phase) pair and every data edge (docs/reliability.md gives the command and its last result).
"""

import errno
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import CHOSEN, PROMPTS, REJECTED, cpu_args
from datasets import Dataset
from safetensors.torch import load_file

from trl_u2a import U2ATrainer
from trl_u2a.safe_state import checkpoint_problem, last_complete_checkpoint

HERE = Path(__file__).parent
SCRIPT = HERE / "scripts" / "u2a_run.py"
LAUNCHER = HERE.parent / "recipes" / "accelerate" / "cpu_ddp.yaml"
FULL_MATRIX = os.environ.get("U2A_FAULT_MATRIX") == "1"
# Short, so the tests stay fast; long enough that a loaded machine's slow rank is not taken for a frozen one
DDP_TIMEOUT = 20
# What a rank may take beyond `ddp_timeout` to exit: its error path and interpreter teardown on a loaded machine
EXIT_MARGIN = 30
# 8 steps, a refresh every 2 (after steps 0, 2, 4, 6) and a checkpoint after each step
RUN = ["max_steps=8", "save_strategy=steps", "save_steps=1", f"ddp_timeout={DDP_TIMEOUT}"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(model: str, out: Path, processes: int, *overrides: str) -> subprocess.Popen:
    """`u2a_run.py` on `processes` CPU processes with the same global batch of 4 (per-device 4 on one, 2 on two)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "LOCAL_RANK", "RANK", "WORLD_"))}
    env.update(ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1")
    script = [str(SCRIPT), model, str(out), str(4 // processes), *overrides]
    if processes == 1:
        command = [sys.executable, *script]
    else:
        command = [
            sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(LAUNCHER),
            "--num_processes", str(processes), "--main_process_port", str(_free_port()), *script,
        ]  # fmt: skip
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _run(model: str, out: Path, processes: int, *overrides: str) -> dict:
    """Run to the end; every rank must report `processes` processes. Returns the result JSON of rank 0."""
    proc = _start(model, out, processes, *overrides)
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output[-5000:]
    _assert_world_size(out, processes)
    result = json.loads(out.read_text())
    assert result["num_processes"] == processes
    return result


def _assert_world_size(out: Path, processes: int) -> list[dict]:
    facts = [json.loads(Path(f"{out}.rank{rank}.json").read_text()) for rank in range(processes)]
    assert [f["num_processes"] for f in facts] == [processes] * processes
    if processes > 1:
        assert all(f["backend"] == "gloo" for f in facts)
    return facts


def _alive(pid: int) -> bool:
    """Whether `pid` still runs (a zombie waiting for the launcher to reap it has exited)."""
    try:
        return "\nState:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False


def _assert_same_result(result: dict, expected: dict) -> None:
    """The same weights, J trajectory and trained parameters, bitwise."""
    assert result["weights"] == expected["weights"]
    assert result["objective"] == expected["objective"]
    assert result["params"].keys() == expected["params"].keys()
    for name, values in expected["params"].items():
        assert result["params"][name] == values, name


def _assert_complete_checkpoints_have_every_rank(output_dir: Path) -> None:
    for checkpoint in output_dir.glob("checkpoint-*"):
        if checkpoint_problem(str(checkpoint)) is None:
            assert {"rng_state_0.pth", "rng_state_1.pth"} <= {p.name for p in checkpoint.iterdir()}, checkpoint


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_path, tmp_path_factory) -> dict:
    """The result of an uninterrupted two-process run with the fault tests' settings."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    return _run(tiny_model_path, tmp / "full.json", 2, f"output_dir={tmp / 'run'}", *RUN)


# ------------------------------------------------------------------------------------------- a frozen or killed rank
# (signal to rank 1, where, the last complete checkpoint it leaves). before_refresh:2: rank 1 stops at the end of step
# 2, so rank 0 waits in the all-reduce of ∇J of the refresh after step 2 (that refresh precedes the save of step 2).
# save:3: rank 1 stops in the save of checkpoint 3 before writing its RNG state, so rank 0 waits in the barrier before
# trainer_state.json.
FAULTS = [
    ("STOP", "before_refresh:2", 1),
    ("KILL", "save:3", 2),
    ("STOP", "step:3", 2),
    ("STOP", "save:3", 2),
    ("KILL", "step:3", 2),
    ("KILL", "before_refresh:2", 1),
]
CI_FAULTS = FAULTS[:2]


@pytest.mark.slow
@pytest.mark.parametrize(
    "sig, where, last",
    [
        f if f in CI_FAULTS or FULL_MATRIX else pytest.param(*f, marks=pytest.mark.skip("U2A_FAULT_MATRIX=1"))
        for f in FAULTS
    ],
)
def test_a_frozen_or_killed_rank_ends_the_run_within_ddp_timeout_and_the_resume_matches(
    tiny_model_path, tmp_path, uninterrupted, sig, where, last, record_property
):
    out, output_dir = tmp_path / "fault.json", tmp_path / "run"
    proc = _start(
        tiny_model_path, out, 2, f"output_dir={output_dir}", *RUN, f"kill_at={where}", f"signal={sig}", "fault_rank=1"
    )
    note, pids = Path(f"{out}.fault"), []
    try:
        deadline = time.time() + 300
        while not note.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert note.exists(), "rank 1 never reached the fault"
        struck = float(note.read_text())
        pids = [f["pid"] for f in _assert_world_size(out, 2)]
        while _alive(pids[0]) and time.time() < struck + DDP_TIMEOUT + EXIT_MARGIN:
            time.sleep(0.2)
        exited = time.time() - struck
        assert not _alive(pids[0]), f"rank 0 still runs {exited:.0f} s after rank 1 got SIG{sig} at {where}"
        record_property("rank0_exit_seconds", round(exited, 1))  # the figure of docs/reliability.md (--junitxml)
    finally:
        # A frozen rank 1 would hold the launcher for its 30 s grace period; anything left after a failure goes too
        for pid in pids:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        if not pids:
            proc.kill()
        output, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0, output[-3000:]
    error = Path(f"{out}.rank0.error.json")
    if sig == "STOP":
        # Rank 0 itself failed: a collective timed out after ddp_timeout (the launcher did not have to stop it)
        failure = json.loads(error.read_text())
        assert DDP_TIMEOUT - 1 <= failure["time"] - struck <= DDP_TIMEOUT + EXIT_MARGIN, failure
        assert f"Timed out waiting {DDP_TIMEOUT * 1000}ms" in failure["error"], failure
        if where.startswith("save"):
            assert "checkpoint-3 at optimizer step 3" in failure["error"] and "checkpoint-2" in failure["error"]
        assert re.search(r"rank\s*: 0 \(local_rank: 0\)\s*exitcode\s*: 1 ", output), output[-3000:]
    assert last_complete_checkpoint(str(output_dir)).endswith(f"checkpoint-{last}")
    _assert_complete_checkpoints_have_every_rank(output_dir)

    result = _run(tiny_model_path, tmp_path / "resumed.json", 2, f"output_dir={output_dir}", *RUN, "resume=true")
    _assert_same_result(result, uninterrupted)
    _assert_complete_checkpoints_have_every_rank(output_dir)


# ------------------------------------------------------------------------------------------------ a NaN on one rank
@pytest.mark.slow
def test_a_nan_on_one_rank_stops_every_rank_at_that_step_with_the_same_message(tiny_model_path, tmp_path):
    """Rank 1 alone gets a poisoned batch at step 3. With 5 negatives (5 rows ≡ 1 modulo the global batch of 4) every
    batch ends a sampler epoch, where `gather_for_metrics` keeps only the first `5 % 4` rows of what it gathers: the
    check on the metrics gather then saw rank 0's row alone, and rank 1 stopped while rank 0 went on into a
    collective."""
    out, output_dir = tmp_path / "nan.json", tmp_path / "run"
    proc = _start(tiny_model_path, out, 2, f"output_dir={output_dir}", *RUN, "negatives=5", "nan_at=3", "fault_rank=1")
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode != 0, output[-3000:]
    _assert_world_size(out, 2)
    failures = [json.loads(Path(f"{out}.rank{rank}.error.json").read_text()) for rank in (0, 1)]
    assert failures[0]["error"] == failures[1]["error"]
    assert failures[0]["error"].startswith("FloatingPointError: Non-finite unlearning loss at optimizer step 3 (train)")
    assert "on rank 1 of 2" in failures[0]["error"]
    # Both stopped at once: neither waited for the other in a collective until ddp_timeout
    assert abs(failures[0]["time"] - failures[1]["time"]) < DDP_TIMEOUT / 2
    # Nothing was saved after the last good step, and that checkpoint is whole and finite
    assert sorted(p.name for p in output_dir.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert last_complete_checkpoint(str(output_dir)).endswith("checkpoint-2")
    _assert_complete_checkpoints_have_every_rank(output_dir)
    model = load_file(str(output_dir / "checkpoint-2" / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in model.values())


# ------------------------------------------------------------------------------- a checkpoint that cannot be written
def _trainer(model, output_dir, **overrides) -> U2ATrainer:
    args = dict(loss_type="npo", budget=4, reweight_steps=2, max_steps=5, save_strategy="steps", save_steps=1)
    return U2ATrainer(
        model=model,
        args=cpu_args(output_dir, **{**args, **overrides}),
        train_dataset=Dataset.from_dict({"prompt": PROMPTS + PROMPTS[:1], "completion": REJECTED + CHOSEN[:1]}),
        alignment_dataset=Dataset.from_dict({"prompt": PROMPTS, "chosen": CHOSEN, "rejected": REJECTED}),
    )


def _fill_the_disk_at(trainer: U2ATrainer, step: int) -> None:
    """The optimizer state of checkpoint `step` is cut short by a full disk."""
    original = trainer._save_optimizer_and_scheduler

    def save(output_dir):
        if trainer.state.global_step != step:
            return original(output_dir)
        path = os.path.join(output_dir, "optimizer.pt")
        with open(path, "wb") as f:
            f.write(b"PK\x03\x04 half an optimizer")
        raise OSError(errno.ENOSPC, "No space left on device", path)

    trainer._save_optimizer_and_scheduler = save


def _trained(trainer: U2ATrainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("failure", ["disk full", "path taken by a file"])
def test_a_checkpoint_that_cannot_be_written_names_path_and_step_and_resume_takes_the_previous_one(
    tiny_model_path, tmp_path, failure
):
    full = _trainer(tiny_model_path, tmp_path / "full")
    full.train()
    output_dir = tmp_path / "run"
    trainer = _trainer(tiny_model_path, output_dir)
    if failure == "disk full":
        _fill_the_disk_at(trainer, 3)
    else:
        output_dir.mkdir(exist_ok=True)
        (output_dir / "checkpoint-3").write_text("not a directory")
    with pytest.raises(RuntimeError) as error:
        trainer.train()
    message = str(error.value)
    assert f"Could not save checkpoint {output_dir / 'checkpoint-3'} at optimizer step 3" in message
    assert "No space left on device" in message if failure == "disk full" else "FileExistsError" in message
    assert f"resume_from_checkpoint=True picks up, is {output_dir / 'checkpoint-2'}" in message
    assert checkpoint_problem(str(output_dir / "checkpoint-3")) is not None
    assert last_complete_checkpoint(str(output_dir)) == str(output_dir / "checkpoint-2")

    if failure != "disk full":
        (output_dir / "checkpoint-3").unlink()  # the user frees the path
    resumed = _trainer(tiny_model_path, output_dir)
    resumed.train(resume_from_checkpoint=True)
    assert torch.equal(resumed.weight_state.weights, full.weight_state.weights)
    expected = _trained(full)
    assert all(torch.equal(value, expected[name]) for name, value in _trained(resumed).items())


def test_a_failed_resave_of_a_complete_checkpoint_leaves_it_incomplete(tiny_model_path, tmp_path):
    """Resuming from an earlier checkpoint saves over later ones: a failure there must not leave the old
    `trainer_state.json` marking new, partial files as complete."""
    _trainer(tiny_model_path, tmp_path, max_steps=3).train()
    assert checkpoint_problem(str(tmp_path / "checkpoint-3")) is None
    again = _trainer(tiny_model_path, tmp_path, max_steps=3)
    _fill_the_disk_at(again, 3)
    with pytest.raises(RuntimeError, match="at optimizer step 3"):
        again.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert "trainer_state.json is missing" in checkpoint_problem(str(tmp_path / "checkpoint-3"))
    assert last_complete_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-2")


# --------------------------------------------------------------------------------------------- unequal data per rank
EDGES = {
    # One negative, so both ranks train the same row; one alignment pair, so rank 1 holds only padding in ∇J, J and
    # the reference log-probs; the pool asks for 8 of the 0 unselected negatives
    "one negative": ["negatives=1", "budget=1", "pairs=1", "pool_size=8"],
    # A budget of one negative out of 3 (a number the 2 ranks do not divide), one pair, a pool of 8 for 2 candidates
    "budget of one": ["negatives=3", "budget=0.1", "pairs=1", "pool_size=8"],
}


@pytest.mark.slow
@pytest.mark.parametrize("edge", list(EDGES))
def test_unequal_data_per_rank_at_the_edges_matches_one_process(tiny_model_path, tmp_path, edge):
    common = ["max_steps=4", f"ddp_timeout={DDP_TIMEOUT}", *EDGES[edge]]
    one = _start(tiny_model_path, tmp_path / "one.json", 1, f"output_dir={tmp_path / 'one'}", *common)
    two = _run(tiny_model_path, tmp_path / "two.json", 2, f"output_dir={tmp_path / 'two'}", *common)
    output, _ = one.communicate(timeout=600)
    assert one.returncode == 0, output[-3000:]
    one = json.loads((tmp_path / "one.json").read_text())
    assert one["num_processes"] == 1
    # Refreshes after steps 0 and 2, each selecting the budget of one negative, then J after training
    assert two["selected_history"] == one["selected_history"] == [1, 1, None]
    assert [w > 0 for w in two["weights"]] == [w > 0 for w in one["weights"]]
    torch.testing.assert_close(torch.tensor(two["weights"]), torch.tensor(one["weights"]), rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.tensor(two["objective"]), torch.tensor(one["objective"]), rtol=1e-6, atol=0)
    for name, value in one["params"].items():
        # The tolerance of test_two_processes_match_one_process: Adam magnifies reduction-order differences
        torch.testing.assert_close(torch.tensor(two["params"][name]), torch.tensor(value), rtol=0, atol=5e-5)
