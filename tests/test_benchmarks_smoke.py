"""The benchmark scripts run end to end on the tiny model and write what docs/benchmarks.md reads.

No timing is asserted: the figures depend on the machine and its load. What is checked is the structure of the
results, that the interleaving scheduler runs one thread at a time in turns, that the synthetic rows have the
requested length, and that ghost scores agree with the per-example loop.
"""

import json
import os
import sys
import threading

import pytest
import torch

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
sys.path.insert(0, BENCHMARKS)

import _common as common  # noqa: E402

ENV_KEYS = (
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "TOKENIZERS_PARALLELISM",
    "TQDM_DISABLE",
    "HF_HUB_OFFLINE",
    "HF_DATASETS_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "HF_HUB_DISABLE_TELEMETRY",
)


@pytest.fixture
def isolated(monkeypatch):
    """The scripts set thread counts and environment variables for their process; undo both after the test."""
    for key in ENV_KEYS:
        if key in os.environ:
            monkeypatch.setenv(key, os.environ[key])
        else:
            monkeypatch.delenv(key, raising=False)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_round_robin_takes_turns():
    names = ["a", "b", "c"]
    baton = common.RoundRobin(names)
    turns = {"a": 3, "b": 1, "c": 2}
    log = []
    running = []

    def work(name):
        baton.acquire(name)
        for i in range(turns[name]):
            running.append(name)
            assert len(running) == 1, "two threads held the baton at once"
            log.append(name)
            running.remove(name)
            if i < turns[name] - 1:
                baton.release(name)
                baton.acquire(name)
        baton.finish(name)

    threads = [threading.Thread(target=work, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads)
    # round r visits the names rotated by r: a b c | b c a | c a b; finished names are skipped
    assert log == ["a", "b", "c", "c", "a", "a"]


def test_synthetic_rows_reach_the_sequence_length():
    from trl_u2a.testing import build_tokenizer

    tokenizer = build_tokenizer()
    data = common.make_data(tokenizer, seq_len=64, n_negatives=6, n_retain=2, n_pairs=3, seed=1)
    assert data["unpaired"]["label"] == [False] * 6 + [True] * 2
    assert len(data["sft"]) == 8 and len(data["pairs"]) == 3

    def length(text):
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    for row in data["unpaired"]:
        assert length(row["prompt"]) <= 32
        assert length(row["prompt"] + row["completion"]) >= 64
    for row in data["pairs"]:
        assert length(row["prompt"] + row["chosen"]) >= 64
        assert length(row["prompt"] + row["rejected"]) >= 64


@pytest.mark.slow
def test_bench_trainer_smoke(tmp_path, isolated):
    import bench_trainer

    out = tmp_path / "trainer.json"
    argv = [
        "--models",
        "tiny",
        "--seq-lens",
        "32",
        "--batch-size",
        "2",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--negatives",
        "8",
        "--retain",
        "4",
        "--pairs",
        "4",
        "--run-steps",
        "4",
        "--reweight-steps",
        "2",
        "--workdir",
        str(tmp_path / "work"),
        "--json",
        str(out),
    ]
    bench_trainer.main(argv)
    report = json.loads(out.read_text())
    case = report["cases"]["tiny/T32"]
    step = case["step"]
    assert set(step["trainers"]) == set(bench_trainer.STEP_TRAINERS)
    for kind, res in step["trainers"].items():
        assert len(res["steps"]) == 3, kind  # warm-up + timed: one turn per optimizer step
    for ratio in step["ratios"].values():
        assert ratio["cpu_median"] > 0 and ratio["wall_median"] > 0
    overhead = case["overhead"]
    runs = overhead["trainers"]
    # refreshes before step 1 and after step 2; none after the last step (4)
    assert runs["u2a_default"]["refresh"]["count"] == 2
    assert [r["step"] for r in runs["u2a_default"]["refresh"]["each"]] == [0, 2]
    assert runs["u2a_off"]["refresh"]["count"] == 0
    assert runs["u2a_default"]["final_objective"] is not None
    # with in-training scores the second refresh rescoring skips the negatives trained since the first
    assert runs["u2a_default"]["num_scored"][0] == [8, 0]  # [scored in the refresh, scored in training]
    assert runs["u2a_no_in_training_scores"]["num_scored"][1][1] == 0
    assert set(overhead["overhead"]) == {"u2a_default", "u2a_no_in_training_scores"}


@pytest.mark.slow
def test_gpu_check_dry_run_on_cpu(tmp_path, isolated):
    import gpu_check

    out = tmp_path / "scoring.json"
    gpu_check.main(
        [
            "--device",
            "cpu",
            "--model",
            "tiny",
            "--seq-lens",
            "32",
            "--quant",
            "none",
            "--n",
            "4",
            "--batch-size",
            "2",
            "--dtype",
            "float32",
            "--workdir",
            str(tmp_path / "work"),
            "--json",
            str(out),
        ]
    )
    case = json.loads(out.read_text())["cases"]["tiny/lora/T32"]
    assert case["ghost_vs_per_example_max_rel_err"] < 1e-4
    assert set(case["results"]) == {"train", "ghost", "per_example"}
    assert case["ghost_vs_per_example_speedup"] > 0


@pytest.mark.slow
def test_refresh_scaling_worker_one_process(tmp_path, isolated):
    import bench_refresh_scaling

    args = bench_refresh_scaling.parse_args(
        ["--negatives", "8", "--retain", "4", "--pairs", "4", "--batch-size", "2", "--repeats", "1"]
    )
    model_path = common.save_model("tiny", str(tmp_path / "models"))
    run = bench_refresh_scaling.launch(args, model_path, 32, 1, str(tmp_path / "p1"))
    (rank,) = run["ranks"]
    assert rank["num_processes"] == 1 and rank["torch_threads"] == 1
    assert [r["kind"] for r in rank["refreshes"]] == ["cold", "warm"]
    assert all(r["num_scored"] == 8 for r in rank["refreshes"])
    cold, warm = rank["refreshes"]
    assert cold["components"]["_reference_pair_logps"][0] > 0
    assert "_score" in warm["components"]
    summary = bench_refresh_scaling.summarise([run])
    assert set(summary) == {"cold", "warm"}


@pytest.mark.slow
def test_gpu_recipes_dry_run_on_cpu(tmp_path, isolated):
    """The GPU recipe runner, on the tiny model: the start model is fine-tuned, the recipe trains in a subprocess with
    the prepared data, and the result records its refreshes and the saved model."""
    import gpu_recipes

    code = gpu_recipes.main(
        ["--out", str(tmp_path), "--device", "cpu", "--tiny", "--max-steps", "2", "--recipes", "pku_saferlhf.yaml"]
    )
    (result,) = json.loads((tmp_path / "recipes.json").read_text())["results"]
    assert code == 0 and result["rc"] == 0 and result["saved"], result["error_tail"]
    assert result["recipe"] == "pku_saferlhf.yaml" and result["launcher"] is None
    assert result["refreshes"][0]["n_selected"] > 0 and result["refreshes"][0]["step"] == 0


@pytest.mark.slow
def test_bench_soak_smoke(tmp_path, isolated):
    """30 steps of the soak benchmark: a sample every 10 steps, refreshes every 5 with in-training scores, a
    checkpoint at step 20 and 30, the summary and the plot."""
    import bench_soak

    out, png = tmp_path / "soak.json", tmp_path / "soak.png"
    argv = ["--steps", "30", "--reweight-steps", "5", "--sample-every", "10", "--warmup-steps", "10", "--save-steps",
            "20", "--negatives", "16", "--retain", "4", "--pairs", "4", "--batch-size", "2", "--seq-len", "32",
            "--workdir", str(tmp_path / "work"), "--json", str(out), "--plot", str(png)]  # fmt: skip
    bench_soak.main(argv)
    report = json.loads(out.read_text())
    assert report["in_training_scores_active"]
    assert [s["step"] for s in report["samples"]] == [10, 20, 30]
    # refreshes before step 1 and after steps 5, 10, ..., 25 (none after the last step)
    assert [r["step"] for r in report["refreshes"]] == [0, 5, 10, 15, 20, 25]
    assert [s["refreshes"] for s in report["samples"]] == [3, 5, 6]
    assert all(r["num_scored_in_training"] > 0 for r in report["refreshes"][1:])
    assert all(r["refresh_cpu_seconds"] > 0 for r in report["refreshes"])
    # one refresh record per refresh; every refresh writes trace rows
    for sample in report["samples"]:
        assert sample["trace_rows"]["u2a_refreshes.jsonl"] == sample["refreshes"]
        assert sample["trace_rows"]["u2a_trace.jsonl"] > sample["trace_rows"]["u2a_refreshes.jsonl"]
    summary = report["summary"]
    assert summary["rss"]["warmup_step"] == 10 and summary["rss"]["at_warmup_mib"] > 0
    assert [c["step"] for c in summary["checkpoint"]["saved"]] == [20, 30]
    assert all(c["u2a_state_bytes"] > 0 for c in summary["checkpoint"]["saved"])
    assert summary["refresh"]["count"] == 6 and summary["refresh"]["first_quarter_count"] >= 1
    # each window between two samples holds refreshes: 5 and 10 | 15 and 20 | 25
    shares = summary["refresh"]["cpu_share_of_training_by_window"]
    assert [w["step"] for w in shares] == [10, 20, 30] and all(w["share"] > 0 for w in shares)
    history = [s["history_json_bytes"] for s in report["samples"]]
    assert history == sorted(history) and summary["history"]["json_bytes_per_refresh"] > 0
    assert png.stat().st_size > 0


@pytest.mark.slow
def test_bench_scale_smoke(tmp_path, isolated):
    """Two tiny sizes in this process: a row per size with the initial pass over every negative, a trace row per
    scored negative, and the per-negative slopes and flatness ratio."""
    import bench_scale

    out = tmp_path / "scale.json"
    argv = ["--negatives", "24", "48", "--steps", "1", "--pairs", "4", "--inline"]
    bench_scale.main([*argv, "--workdir", str(tmp_path / "work"), "--json", str(out)])
    report = json.loads(out.read_text())
    # The command as run, less the scratch directory
    assert report["command"] == "python benchmarks/bench_scale.py " + " ".join([*argv, "--json", str(out)])
    rows = report["rows"]
    assert [r["negatives"] for r in rows] == [24, 48]
    for r in rows:
        assert r["initial_pass_scored"] == r["negatives"] and r["refreshes"] >= 1
        assert r["run_peak_rise_mib"] >= r["initial_pass_peak_rise_mib"]  # the peak of the run includes the pass
        assert r["initial_pass_s"] > 0 and r["run_s"] >= r["initial_pass_s"]
        assert r["dataset_bytes"] > 0 and r["weight_state_bytes"] == 2 * 8 * r["negatives"]
    # The trace has at least one row per scored negative: about twice the bytes at twice the negatives
    assert 1.5 < rows[1]["trace_bytes"] / rows[0]["trace_bytes"] < 2.5
    summary = report["summary"]
    assert summary["flatness"]["from"] == 24 and summary["flatness"]["to"] == 48
    assert summary["trace_bytes_per_negative"] > 0
