"""`trl-u2a prepare-data`: schema adapters, the paper's splits, errors, and that the output feeds `U2ATrainer`."""

import contextlib
import json
import random

import pytest
import torch
from conftest import cpu_args
from datasets import Dataset, load_from_disk

from trl_u2a.cli import main as trl_u2a_main
from trl_u2a.prepare_data import build_splits, cli, detect_schema, prepare_data, to_pairs


@contextlib.contextmanager
def one_thread():
    # Tiny models gain nothing from intra-op threads, and on a shared 2-core machine two OpenMP threads that wait for
    # each other made a training step of the tiny model 20 times slower (2.8 s instead of 0.13 s)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


TOPICS = ["bread", "gardening", "saving money", "learning to code", "chess", "running", "painting", "cooking rice"]


def pku_rows(num_prompts=30, pairs_per_prompt=2, both_safe_every=5, seed=0):
    """PKU-SafeRLHF-shaped rows. Safe responses start with "SAFE", unsafe ones with "UNSAFE"; every
    `both_safe_every`-th row has two safe responses (dropped unless --pku_all_pairs)."""
    rng = random.Random(seed)
    rows = []
    for p in range(num_prompts):
        prompt = f"Question {p}: how do I get better at {TOPICS[p % len(TOPICS)]}?"
        for k in range(pairs_per_prompt):
            both_safe = len(rows) % both_safe_every == 0
            safer = rng.randint(0, 1)
            safe_text = f"SAFE answer {p}.{k}: practise a little every day."
            other_text = f"SAFE alternative {p}.{k}: ask a friend." if both_safe else f"UNSAFE answer {p}.{k}: cheat."
            responses = {safer: safe_text, 1 - safer: other_text}
            rows.append(
                {
                    "prompt": prompt,
                    "response_0": responses[0],
                    "response_1": responses[1],
                    "is_response_0_safe": both_safe or safer == 0,
                    "is_response_1_safe": both_safe or safer == 1,
                    "better_response_id": rng.randint(0, 1),
                    "safer_response_id": safer,
                }
            )
    return rows


def write_pku_file(path, **kwargs):
    with open(path, "w") as f:
        for row in pku_rows(**kwargs):
            f.write(json.dumps(row) + "\n")
    return str(path)


def ultrafeedback_rows(num_prompts=24, seed=0):
    """UltraFeedback-binarized-shaped rows: chosen/rejected are [user, assistant] message lists, no prompt column."""
    rng = random.Random(seed)
    rows = []
    for p in range(num_prompts):
        user = {"role": "user", "content": f"Explain {TOPICS[p % len(TOPICS)]} in one sentence ({p})."}
        good = {"role": "assistant", "content": f"GOOD explanation {p}."}
        bad = {"role": "assistant", "content": f"BAD explanation {p}."}
        rows.append({"chosen": [user, good], "rejected": [user, bad], "score_chosen": 8.0 + rng.random()})
    return rows


def prompt_ids(split):
    return set(split["prompt_id"])


def test_pku_splits_are_disjoint_by_prompt_and_honour_the_fractions(tmp_path, capsys):
    source = write_pku_file(tmp_path / "pku.jsonl", num_prompts=30, pairs_per_prompt=2)
    out = tmp_path / "pku"
    code = trl_u2a_main(
        ["prepare-data", "--dataset", source, "--output_dir", str(out), "--num_test_prompts", "5", "--seed", "1"]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "split" in printed and "forget" in printed and "rejected share of original" in printed

    splits = load_from_disk(str(out))
    assert set(splits) == {"alignment", "original", "forget", "retain", "train", "test_prompts", "test_pairs", "test"}
    # 60 rows, every 5th with two safe responses: 12 dropped, 48 pairs over 30 prompts (each prompt keeps ≥ 1 pair)
    summary = json.loads((out / "u2a_prepare_data.json").read_text())
    assert summary["pairs"] == 48 and summary["dropped"]["same_safety"] == 12

    test, alignment, train = (
        prompt_ids(splits["test_prompts"]),
        prompt_ids(splits["alignment"]),
        prompt_ids(splits["original"]),
    )
    assert len(test) == 5 and len(splits["test_prompts"]) == 5
    assert len(alignment) == round(0.2 * (30 - 5))
    assert not (test & alignment) and not (test & train) and not (alignment & train)
    assert test | alignment | train == set(range(30))
    assert prompt_ids(splits["test_pairs"]) == test and splits["test"].to_list() == splits["test_pairs"].to_list()
    # Prompt text, not just ids, is disjoint across the splits
    texts = {name: set(splits[name]["prompt"]) for name in ("test_prompts", "alignment", "original")}
    assert not (texts["test_prompts"] & texts["alignment"]) and not (texts["alignment"] & texts["original"])

    original = splits["original"]
    num_rejected = sum(not label for label in original["label"])
    assert num_rejected == round(0.65 * len(original))
    assert len(splits["forget"]) == num_rejected and len(splits["retain"]) == len(original) - num_rejected
    assert all(c.startswith("UNSAFE") for c in splits["forget"]["completion"])
    assert all(c.startswith("SAFE") for c in splits["retain"]["completion"])
    assert not any(splits["forget"]["label"]) and all(splits["retain"]["label"])
    assert splits["train"].to_list() == splits["forget"].to_list() + splits["retain"].to_list()
    assert all(c.startswith("SAFE") for c in splits["alignment"]["chosen"])
    assert all(r.startswith("UNSAFE") for r in splits["alignment"]["rejected"])


def test_pku_all_pairs_keeps_same_safety_pairs_and_chooses_the_safer_response():
    source = Dataset.from_list(pku_rows(num_prompts=10))
    pairs, dropped = to_pairs(source, pku_all_pairs=True)
    assert len(pairs) == len(source) and dropped["same_safety"] == 0
    for pair in pairs:
        row = source[pair["source_row"]]
        assert pair["chosen"] == row[f"response_{row['safer_response_id']}"]


def test_splits_are_a_function_of_the_seed():
    pairs, _ = to_pairs(Dataset.from_list(pku_rows(num_prompts=20)))
    first, again = build_splits(pairs, num_test_prompts=4, seed=3), build_splits(pairs, num_test_prompts=4, seed=3)
    other = build_splits(pairs, num_test_prompts=4, seed=4)
    assert first["train"].to_list() == again["train"].to_list()
    assert first["forget"].to_list() != other["forget"].to_list()


@pytest.mark.parametrize("conversational", [False, True])
def test_ultrafeedback_takes_the_assistant_turn(tmp_path, conversational):
    source = tmp_path / "uf.parquet"
    Dataset.from_list(ultrafeedback_rows()).to_parquet(str(source))
    splits, summary = prepare_data(
        str(source), str(tmp_path / "uf"), num_test_prompts=4, rejected_fraction=0.7, conversational=conversational
    )
    assert summary["pairs"] == 24
    assert len(splits["original"]) == 24 - 4 - round(0.2 * 20)
    assert sum(not label for label in splits["original"]["label"]) == round(0.7 * len(splits["original"]))
    forget, alignment = splits["forget"][0], splits["alignment"][0]
    if conversational:
        assert forget["prompt"][0]["role"] == "user" and forget["prompt"][0]["content"].startswith("Explain")
        assert forget["completion"] == [{"role": "assistant", "content": forget["completion"][0]["content"]}]
        assert forget["completion"][0]["content"].startswith("BAD")
        assert alignment["chosen"][0]["content"].startswith("GOOD")
    else:
        assert forget["prompt"].startswith("Explain") and forget["completion"].startswith("BAD")
        assert alignment["chosen"].startswith("GOOD") and alignment["rejected"].startswith("BAD")
    assert detect_schema(Dataset.from_list(ultrafeedback_rows(2))) == "ultrafeedback"


def test_generic_preference_csv_and_save_to_disk_sources(tmp_path):
    rows = [{"prompt": f"Prompt {i}?", "chosen": f"Good {i}.", "rejected": f"Bad {i}."} for i in range(12)]
    rows.append({"prompt": "Tie?", "chosen": "Same.", "rejected": "Same."})
    csv = tmp_path / "pairs.csv"
    Dataset.from_list(rows).to_csv(str(csv))
    _, summary = prepare_data(str(csv), str(tmp_path / "a"), num_test_prompts=2)
    assert summary["pairs"] == 12 and summary["dropped"]["identical"] == 1
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "disk"))
    splits, _ = prepare_data(str(tmp_path / "disk"), str(tmp_path / "b"), num_test_prompts=2, format="preference")
    assert len(splits["test_prompts"]) == 2


def test_hub_ids_go_through_load_dataset(monkeypatch, tmp_path):
    import datasets

    calls = []

    def fake_load_dataset(path, name=None, split=None, **kwargs):
        calls.append((path, name, split))
        return Dataset.from_list(pku_rows(num_prompts=12))

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    prepare_data("PKU-Alignment/PKU-SafeRLHF", str(tmp_path / "out"), num_test_prompts=2, dataset_config="default")
    assert calls == [("PKU-Alignment/PKU-SafeRLHF", "default", "train")]


def test_errors_name_the_problem(tmp_path):
    unknown = Dataset.from_dict({"question": ["q"], "answer": ["a"]})
    with pytest.raises(ValueError, match=r"columns \['answer', 'question'\].*pku_saferlhf.*ultrafeedback.*preference"):
        to_pairs(unknown)
    pku = Dataset.from_list(pku_rows(num_prompts=3))
    with pytest.raises(ValueError, match="do not fit --format ultrafeedback"):
        to_pairs(pku, "ultrafeedback")
    with pytest.raises(ValueError, match=r"must hold strings.*--format ultrafeedback"):
        to_pairs(Dataset.from_list(ultrafeedback_rows(2)).add_column("prompt", ["p", "q"]), "preference")

    source = write_pku_file(tmp_path / "pku.jsonl", num_prompts=10)
    for flag, value in (("alignment_fraction", 0.0), ("alignment_fraction", 1.0), ("rejected_fraction", 1.5)):
        with pytest.raises(ValueError, match=f"--{flag} {value} must be in \\(0, 1\\)"):
            prepare_data(source, str(tmp_path / "x"), num_test_prompts=2, **{flag: value})
    with pytest.raises(ValueError, match=r"Too few rows.*--num_test_prompts 2000 holds out 10 prompts.*Pass --num"):
        prepare_data(source, str(tmp_path / "x"), num_test_prompts=2000)
    with pytest.raises(FileNotFoundError, match="no such file"):
        prepare_data(str(tmp_path / "missing.jsonl"), str(tmp_path / "x"))


def test_prepared_splits_feed_the_trainer(tiny_model_path, tmp_path):
    from trl_u2a import U2ATrainer

    source = write_pku_file(tmp_path / "pku.jsonl", num_prompts=16)
    prepare_data(source, str(tmp_path / "pku"), num_test_prompts=2)
    splits = load_from_disk(str(tmp_path / "pku"))
    trainer = U2ATrainer(
        model=tiny_model_path,
        args=cpu_args(tmp_path / "run", max_steps=1, per_device_train_batch_size=2, loss_type="ga"),
        train_dataset=splits["train"],
    )
    assert trainer.num_negatives == len(splits["forget"])
    trainer.train()
    assert trainer.state.global_step == 1


def test_prepared_alignment_split_feeds_the_trainer(tiny_model_path, tmp_path):
    from trl_u2a import U2ATrainer

    source = write_pku_file(tmp_path / "pku.jsonl", num_prompts=16)
    prepare_data(source, str(tmp_path / "pku"), num_test_prompts=2, conversational=True)
    splits = load_from_disk(str(tmp_path / "pku"))
    trainer = U2ATrainer(
        model=tiny_model_path,
        args=cpu_args(tmp_path / "run", max_steps=1, per_device_train_batch_size=2, budget=0.5),
        train_dataset=splits["train"],
        alignment_dataset=splits["alignment"],
    )
    trainer.train()
    assert trainer.state.global_step == 1


def test_a_small_file_with_the_default_sizes_names_the_sizes_and_the_flag_that_fits(tmp_path, capsys):
    source = write_pku_file(tmp_path / "pku.jsonl", num_prompts=40)
    assert trl_u2a_main(["prepare-data", "--dataset", source, "--output_dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and "-" + "390" not in err
    assert "--num_test_prompts 2000 holds out 40 prompts for testing, leaving 0" in err
    suggested = int(err.split("Pass --num_test_prompts ")[1].split()[0])
    assert cli(["--dataset", source, "--output_dir", str(tmp_path / "out"), "--num_test_prompts", str(suggested)]) == 0


def test_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit):
        cli(["--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "(default: 2000)" in out and "(default: 0.2)" in out and "--alignment_split alignment" in out


def test_an_unreachable_hub_fails_fast_in_one_line_naming_the_offline_alternative(monkeypatch, tmp_path, capsys):
    import socket
    import time

    import datasets
    from huggingface_hub import constants

    with socket.socket() as s:  # a port nothing listens on: the connection is refused at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("load_dataset must not be reached"))
    started = time.monotonic()
    argv = ["prepare-data", "--dataset", "some-org/some-dataset", "--output_dir", str(tmp_path / "out")]
    assert trl_u2a_main(argv) == 2 and time.monotonic() - started < 10
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "--dataset 'some-org/some-dataset' is not a local path and cannot be loaded from the Hub" in err
    assert "load_from_disk" in err and "HF_HUB_OFFLINE=1" in err


def test_an_uncached_hub_id_offline_fails_in_one_line(tmp_path, capsys):
    # The tests run with HF_HUB_OFFLINE=1: datasets raises its own ConnectionError for an id not in the cache
    argv = ["prepare-data", "--dataset", "some-org/not-in-the-cache", "--output_dir", str(tmp_path / "out")]
    assert trl_u2a_main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot be loaded from the Hub" in err and "Traceback" not in err
