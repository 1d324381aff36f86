"""Run every `trl-u2a train` recipe on the GPU machine, as a user would, on a model built from a config (no hub).

Each recipe of `recipes/` runs for `--max-steps` optimizer steps with only the model, the data, the output directory,
the run length and the budget overridden: its loss, LoRA/QLoRA/full set-up, dtype, gradient checkpointing and U2A
settings are its own. The multi-GPU recipes run under their `recipes/accelerate/` launcher with one process per
visible GPU (`lora_multi_gpu.yaml` under DDP, FSDP2 and ZeRO-2; `full_zero3.yaml` under ZeRO-3); on one card that
is one process, which checks the launcher configs and the sharded code paths on a GPU but not the communication (the
two-process CPU runs of `tests/test_recipes.py` check that).

The model is Qwen2.5-0.5B's shape (`benchmarks/_common.py` preset `qwen0.5b`, random weights, the offline test
tokenizer); the data is the synthetic preference task (`trl_u2a.synthetic`) passed through `trl-u2a prepare-data`,
once as strings and once as chat messages, as the recipes expect. For each run it records the exit code, the wall
time, the refresh records (`u2a_refreshes.jsonl`: selected negatives, `J`) and whether the model was saved, and
writes `recipes.json` and a table.

Usage:
    python benchmarks/gpu_recipes.py --out DIR                       # on the GPU machine (benchmarks/gpu_check.sh)
    python benchmarks/gpu_recipes.py --out DIR --device cpu --tiny   # dry run here: tiny model, in-process recipes
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as common

ROOT = Path(__file__).resolve().parents[1]
# recipe -> launchers it is run under (None: a plain `python -m trl_u2a.scripts.u2a`, as its header says)
RUNS = {
    "tiny.yaml": [None],
    "qlora_8b_single_gpu.yaml": [None],
    "pku_saferlhf.yaml": [None],
    "ultrafeedback.yaml": [None],
    "lora_multi_gpu.yaml": ["ddp.yaml", "fsdp2.yaml", "zero2.yaml"],
    "full_zero3.yaml": ["zero3.yaml"],
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="directory for recipes.json and the run logs")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--tiny", action="store_true", help="the tiny model and the in-process recipes only")
    parser.add_argument("--max-steps", type=int, default=10)
    parser.add_argument("--recipes", default=None, help="comma-separated recipe file names (default: all)")
    parser.add_argument("--timeout", type=int, default=300, help="seconds per run")
    return parser.parse_args(argv)


def prepare(work: Path, tiny: bool) -> dict[str, str]:
    """The model and the prepared data the recipes read (`data/pku`, `data/pku-chat`, `data/ultrafeedback`)."""
    from trl_u2a.prepare_data import prepare_data
    from trl_u2a.synthetic import make_u2a_task

    model = common.save_model("tiny" if tiny else "qwen0.5b", str(work / "models"), dtype="float32")
    task = make_u2a_task(seed=0, n_prompts=120 if tiny else 360)
    source = work / "pairs.jsonl"
    with open(source, "w") as f:
        for split in ("alignment", "test_pairs"):
            for row in task[split]:
                f.write(json.dumps({k: row[k] for k in ("prompt", "chosen", "rejected")}) + "\n")
    data = {}
    for name, conversational in (("pku", False), ("pku-chat", True)):
        prepare_data(str(source), str(work / "data" / name), num_test_prompts=8, conversational=conversational)
        data[name] = str(work / "data" / name)
    data["ultrafeedback"] = data["pku"]  # the paper recipes read strings (prepare-data without --conversational)
    return {"model": start_model(model, data["pku"], work / "start-model", tiny), **data}


def start_model(path: str, data: str, out: Path, tiny: bool) -> str:
    """The built model briefly fine-tuned on the `original` split, as the paper's start model is (at random weights
    the first refresh rightly selects nothing)."""
    from datasets import load_from_disk

    from trl_u2a.testing import fine_tune_start_model

    original = load_from_disk(str(Path(data) / "original"))
    return fine_tune_start_model(path, original, out, learning_rate=3e-3 if tiny else 3e-4, batch_size=16)


def overrides(recipe: str, prepared: dict, output_dir: Path, args) -> list[str]:
    import yaml

    raw = yaml.safe_load((ROOT / "recipes" / recipe).read_text())
    name = Path(raw["dataset_name"]).name
    out = [
        "--model_name_or_path", prepared["model"],
        "--output_dir", str(output_dir),
        "--max_steps", str(args.max_steps),
        "--save_strategy", "no",
        "--report_to", "none",
        "--logging_steps", "1",
        "--budget", "0.5",  # the paper's budget (1024) and pa_samples (512) exceed the small data
        "--pa_samples", "16",
        "--reweight_steps", str(max(1, args.max_steps // 2)),
    ]  # fmt: skip
    if name != "synthetic":
        out += ["--dataset_name", prepared[name]]
    if args.device == "cpu":
        out += ["--use_cpu", "true", "--bf16", "false"]
    return out


def run(recipe: str, launcher: str | None, prepared: dict, work: Path, args) -> dict:
    label = recipe if launcher is None else f"{recipe} @ {launcher}"
    output_dir = work / "runs" / label.replace(" @ ", "@").replace(".yaml", "")
    module = ["-m", "trl_u2a.scripts.u2a", "--config", str(ROOT / "recipes" / recipe)]
    if launcher is None:
        command = [sys.executable, *module]
    else:
        import torch

        processes = max(1, torch.cuda.device_count())
        command = [
            sys.executable, "-m", "accelerate.commands.launch",
            "--config_file", str(ROOT / "recipes" / "accelerate" / launcher),
            "--num_processes", str(processes),
            *module,
        ]  # fmt: skip
    command += overrides(recipe, prepared, output_dir, args)
    start = time.perf_counter()
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout, cwd=work)
        code, output = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        code, output = (
            "timeout",
            (e.stdout or b"").decode(errors="replace") + (e.stderr or b"").decode(errors="replace"),
        )
    seconds = time.perf_counter() - start
    log = Path(args.out) / "logs" / (output_dir.name + ".log")
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(" ".join(command) + "\n\n" + output)
    refreshes_file = output_dir / "u2a_refreshes.jsonl"
    refreshes = (
        [json.loads(line) for line in refreshes_file.read_text().splitlines()] if refreshes_file.exists() else []
    )
    saved = any((output_dir / f).exists() for f in ("model.safetensors", "adapter_model.safetensors"))
    return {
        "recipe": recipe,
        "launcher": launcher,
        "rc": code,
        "seconds": round(seconds, 1),
        "refreshes": [
            {k: r.get(k) for k in ("refresh", "step", "objective", "n_selected", "refresh_seconds")} for r in refreshes
        ],
        "saved": saved,
        "log": str(log),
        "error_tail": output[-1500:] if code != 0 else None,
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    common.set_threads(1 if args.device == "cpu" else 4)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu_recipes."))
    prepared = prepare(work, args.tiny)
    wanted = args.recipes.split(",") if args.recipes else list(RUNS)
    results = []
    for recipe in wanted:
        # The sharded launchers need GPUs (on CPU, tests/test_recipes.py runs them with a test-only shim)
        for launcher in RUNS[recipe] if args.device == "cuda" else [None]:
            results.append(run(recipe, launcher, prepared, work, args))
            r = results[-1]
            print(f"{r['recipe']:28s} {r['launcher'] or '-':12s} rc={r['rc']} {r['seconds']:7.1f}s", flush=True)
    summary = {
        "command": " ".join([sys.executable, *sys.argv]),
        "machine": common.machine_info(),
        "code": common.code_version(),
        "model": prepared["model"],
        "results": results,
    }
    (out / "recipes.json").write_text(json.dumps(summary, indent=2))
    print(f"\n{'recipe':28s} {'launcher':12s} {'rc':>8s} {'seconds':>8s} {'refreshes':>9s} {'selected':>9s} saved")
    for r in results:
        selected = r["refreshes"][0]["n_selected"] if r["refreshes"] else None
        print(
            f"{r['recipe']:28s} {r['launcher'] or '-':12s} {r['rc']!s:>8s} {r['seconds']:8.1f} "
            f"{len(r['refreshes']):9d} {selected!s:>9s} {r['saved']}"
        )
    return 0 if all(r["rc"] == 0 and r["saved"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
