"""Past one machine: a two-node launch on loopback trains as one process does.

Two `accelerate launch` processes, one per "node" (`--num_machines 2 --machine_rank 0|1`, one rank each), meet by
static rendezvous on 127.0.0.1 and run `trl-u2a train` with `recipes/tiny.yaml` as real DDP over gloo on the CPU
(`ACCELERATE_USE_CPU=true`, `--mixed_precision no`). This is the launch line of the Slurm recipe in docs/recipes.md
with the host names replaced by the loopback address. The ranks must see a world of 2 and end with the weights of
the negatives and the model parameters of a one-process run over the same global batches.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from trl_u2a.scripts.u2a import cli

ROOT = Path(__file__).resolve().parents[1]
SHIM = Path(__file__).resolve().parent / "shim"  # records each rank's distributed facts (tests/shim/sitecustomize.py)
# SGD: its update is linear in the gradient, so a wrongly reduced gradient shows at full size (Adam's first step is
# about lr·sign(g)). A refresh after every step with the identity preconditioner: refreshes 0-2 run their sharded
# scoring and gathers, and Adam's near-zero second moments would magnify float noise (tests/test_recipes.py).
RUN = [
    "--config", str(ROOT / "recipes" / "tiny.yaml"),
    "--max_steps", "3",
    "--per_device_train_batch_size", "4",
    "--optim", "sgd",
    "--learning_rate", "0.1",
    "--reweight_steps", "1",
    "--preconditioner", "identity",
    "--save_refresh_plots", "false",
    "--disable_tqdm", "true",
    "--logging_steps", "1",
]  # fmt: skip
# The CLI logs its world size at INFO, which Python does not show by default: the launched ranks run it with INFO on
DRIVER = "import logging, sys\nlogging.basicConfig(level=logging.INFO)\nfrom trl_u2a.scripts.u2a import cli\ncli()\n"


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _weights(directory):
    from safetensors.torch import load_file

    return load_file(str(Path(directory) / "model.safetensors"))


def _last_refresh(directory):
    """`(refresh index, {example_id: weight})` of the last refresh in the trace the callback writes."""
    rows = [json.loads(line) for line in (Path(directory) / "u2a_trace.jsonl").read_text().splitlines()]
    last = max(row["refresh"] for row in rows)
    return last, {row["example_id"]: row["weight"] for row in rows if row["refresh"] == last}


@pytest.mark.slow
def test_two_nodes_on_loopback_match_one_process(tmp_path):
    driver = tmp_path / "train.py"
    driver.write_text(DRIVER)
    facts_dir = tmp_path / "facts"
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "LOCAL_RANK", "RANK", "WORLD_"))}
    env = {
        **clean,
        "PYTHONPATH": os.pathsep.join(p for p in (str(SHIM), str(ROOT), os.environ.get("PYTHONPATH")) if p),
        "U2A_FACTS_DIR": str(facts_dir),
        "ACCELERATE_USE_CPU": "true",
        "OMP_NUM_THREADS": "1",
    }
    port = _free_port()

    def node_command(rank):
        return [
            sys.executable, "-m", "accelerate.commands.launch",
            "--config_file", str(ROOT / "recipes" / "accelerate" / "cpu_ddp.yaml"),
            "--num_machines", "2",
            "--num_processes", "2",  # in all: one per node
            "--machine_rank", str(rank),
            "--main_process_ip", "127.0.0.1",
            "--main_process_port", str(port),
            "--rdzv_backend", "static",
            "--mixed_precision", "no",
            str(driver), *RUN, "--output_dir", str(tmp_path / "two_nodes"),
        ]  # fmt: skip

    # Output to files, not pipes: a node blocked on a full pipe would stall the other one in a collective
    logs = [tmp_path / f"node{rank}.log" for rank in (0, 1)]
    nodes = []
    for rank, log in enumerate(logs):
        with open(log, "w") as out:
            nodes.append(
                subprocess.Popen(node_command(rank), env=env, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT)
            )
    try:
        for node in nodes:
            node.wait(timeout=240)
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
    outputs = [log.read_text() for log in logs]
    report = "\n".join(f"--- node {i} ---\n{out[-4000:]}" for i, out in enumerate(outputs))
    assert [node.returncode for node in nodes] == [0, 0], report

    facts = [json.loads(path.read_text()) for path in sorted(facts_dir.glob("rank*.json"))]
    assert [f["process_index"] for f in facts] == [0, 1], report
    for rank in facts:
        assert rank["distributed_type"] == "DistributedType.MULTI_CPU" and not rank["cpu_shim"]
        assert rank["num_processes"] == 2 and rank["world_size"] == 2 and rank["process_group_backend"] == "gloo"
        assert rank["model_classes"][0] == "DistributedDataParallel"
    # Rank 0 (node 0) logs the run's shape at start; rank 1 logs nothing of it (one line per run)
    start_line = "U2A: 2 process(es), distributed type DistributedType.MULTI_CPU, mixed precision no"
    assert start_line in outputs[0] and start_line not in outputs[1], report

    cli([*RUN, "--per_device_train_batch_size", "8", "--output_dir", str(tmp_path / "one")])
    two, one = tmp_path / "two_nodes", tmp_path / "one"
    # Each run built the offline tiny model into its output_dir: the same start model
    start_two, start_one = _weights(two / "tiny-model"), _weights(one / "tiny-model")
    assert all((start_two[k] == start_one[k]).all() for k in start_one)

    (refresh_two, weights_two), (refresh_one, weights_one) = _last_refresh(two), _last_refresh(one)
    assert refresh_two == refresh_one == 2
    selected = {i for i, w in weights_one.items() if w > 0}
    assert {i for i, w in weights_two.items() if w > 0} == selected and selected
    assert weights_two.keys() == weights_one.keys()
    # Measured: 2.7e-6 apart on weights of order 1 (float32 scores summed in another order), 7e-9 on parameters that
    # moved by 2e-2
    assert max(abs(weights_two[i] - weights_one[i]) for i in weights_one) <= 2e-5

    params_two, params_one = _weights(two), _weights(one)
    assert params_two.keys() == params_one.keys()
    moved = max((params_one[k] - start_one[k]).abs().max().item() for k in params_one)
    difference = max((params_two[k] - params_one[k]).abs().max().item() for k in params_one)
    assert moved > 1e-3 and difference <= 1e-6, (moved, difference)


SBATCH = ROOT / "recipes" / "slurm" / "u2a_multinode.sbatch"
# Stand-ins for Slurm and the launcher: `srun` runs its command once per node with that node's SLURM_NODEID,
# `scontrol show hostnames` lists the allocation, `accelerate` writes the arguments each node would launch with
STUBS = {
    "srun": '[ "$1" = --kill-on-bad-exit=1 ] && shift\nfor ((id = 0; id < SLURM_NNODES; id++)); do\n'
    '  SLURM_NODEID=$id "$@" || exit $?\ndone\n',
    # The second host comes a moment later: a reader that stops after the first line (`head -n 1`) closes the pipe
    # first, and under `set -o pipefail` the SIGPIPE of scontrol would fail the job
    "scontrol": '[ "$*" = "show hostnames $SLURM_JOB_NODELIST" ] && echo gpu-a && sleep 0.2 && echo gpu-b\n',
    "accelerate": 'printf "%s\\n" "$@" > "$LAUNCHED/node$SLURM_NODEID"\n',
}


def _run_sbatch(tmp_path, **env):
    bin_dir, launched = tmp_path / "bin", tmp_path / "launched"
    bin_dir.mkdir()
    launched.mkdir()
    for name, body in STUBS.items():
        (bin_dir / name).write_text("#!/bin/bash\n" + body)
        (bin_dir / name).chmod(0o755)
    slurm = {"SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "gpu-[a-b]", "SLURM_JOB_NAME": "u2a", "SLURM_JOB_ID": "42"}
    environment = {**os.environ, **slurm, **env, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    environment["LAUNCHED"] = str(launched)
    result = subprocess.run(["bash", str(SBATCH)], env=environment, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return [(launched / f"node{i}").read_text().splitlines() for i in (0, 1)]


def _option(args, name):
    return args[args.index(name) + 1]


def test_slurm_recipe_is_valid_bash():
    result = subprocess.run(["bash", "-n", str(SBATCH)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_slurm_recipe_launches_one_machine_rank_per_node(tmp_path):
    nodes = _run_sbatch(tmp_path)
    for rank, args in enumerate(nodes):
        assert _option(args, "--machine_rank") == str(rank)
        assert _option(args, "--num_machines") == "2"
        assert _option(args, "--num_processes") == "16"  # in all: 8 GPUs on each of the 2 nodes
        assert _option(args, "--main_process_ip") == "gpu-a"  # the first node, machine rank 0
        assert _option(args, "--rdzv_backend") == "static"
        assert _option(args, "--config_file") == "recipes/accelerate/ddp.yaml"
        assert (ROOT / _option(args, "--config_file")).is_file() and (ROOT / _option(args, "--config")).is_file()
        assert _option(args, "--output_dir") == "runs/u2a-42" and _option(args, "--ddp_timeout") == "1800"
        assert "--resume_from_checkpoint" not in args
    assert nodes[0][nodes[0].index("-m") :] == nodes[1][nodes[1].index("-m") :]  # the same run on every node


def test_slurm_recipe_takes_its_settings_from_the_environment(tmp_path):
    settings = {
        "RECIPE": "recipes/full_zero3.yaml",
        "LAUNCHER": "recipes/accelerate/zero3.yaml",
        "GPUS_PER_NODE": "4",
        "OUTPUT_DIR": "runs/u2a-7",
        "RESUME": "last",
        "MAIN_PROCESS_PORT": "29611",
    }
    for args in _run_sbatch(tmp_path, **settings):
        assert _option(args, "--config") == "recipes/full_zero3.yaml"
        assert _option(args, "--config_file") == "recipes/accelerate/zero3.yaml"
        assert _option(args, "--num_processes") == "8" and _option(args, "--main_process_port") == "29611"
        assert _option(args, "--output_dir") == "runs/u2a-7" and _option(args, "--resume_from_checkpoint") == "last"
