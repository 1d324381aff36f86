import collections

import pytest

from trl_u2a.synthetic import (
    REJECTED_KINDS,
    _prompt_space,
    contains_harm_words,
    default_corpus,
    make_training_splits,
    make_u2a_task,
)

SPLITS = ("alignment", "original", "forget", "retain", "test_prompts", "test_pairs")


@pytest.fixture(scope="module")
def task():
    return make_u2a_task(seed=0)


def _rows(task):
    return {name: task[name].to_list() for name in SPLITS}


def _ids(rows):
    return {row["prompt_id"] for row in rows}


def test_prompt_space_is_large_and_distinct():
    prompts = [prompt for _, _, prompt in _prompt_space()]
    assert len(prompts) == len(set(prompts)) >= 60


def test_same_seed_same_data_different_seed_different(task):
    assert set(task) == set(SPLITS)
    assert _rows(make_u2a_task(seed=0)) == _rows(task)
    other = _rows(make_u2a_task(seed=1))
    for name in SPLITS:
        assert other[name] != _rows(task)[name], name


def test_columns_and_sizes(task):
    assert task["original"].column_names == ["prompt_id", "topic", "prompt", "completion", "kind"]
    assert task["forget"].column_names == ["prompt_id", "topic", "prompt", "completion", "kind", "label"]
    assert task["retain"].column_names == task["forget"].column_names
    assert task["alignment"].column_names == ["prompt_id", "topic", "prompt", "chosen", "rejected", "kind"]
    assert task["test_pairs"].column_names == task["alignment"].column_names
    assert task["test_prompts"].column_names == ["prompt_id", "topic", "prompt"]
    rows = _rows(task)
    assert (len(_ids(rows["alignment"])), len(_ids(rows["test_prompts"])), len(_ids(rows["original"]))) == (
        40,
        40,
        120,
    )
    assert len(rows["alignment"]) == len(rows["test_pairs"]) == 80


def test_prompts_disjoint_across_alignment_train_test(task):
    rows = _rows(task)
    align, test, train = _ids(rows["alignment"]), _ids(rows["test_prompts"]), _ids(rows["original"])
    assert not (align & test) and not (align & train) and not (test & train)
    assert _ids(rows["test_pairs"]) == test and _ids(rows["forget"]) | _ids(rows["retain"]) == train
    texts = {name: {row["prompt"] for row in rows[name]} for name in ("alignment", "test_prompts", "original")}
    assert not (texts["alignment"] & texts["test_prompts"]) and not (texts["alignment"] & texts["original"])
    assert not (texts["test_prompts"] & texts["original"])
    # One prompt text per id, the same everywhere.
    by_id = collections.defaultdict(set)
    for name in SPLITS:
        for row in rows[name]:
            by_id[row["prompt_id"]].add(row["prompt"])
    assert all(len(prompts) == 1 for prompts in by_id.values())


def test_forget_and_retain_are_the_rejected_and_chosen_rows_of_original(task):
    rows = _rows(task)

    def key(row):
        return row["prompt_id"], row["prompt"], row["completion"], row["kind"]

    rejected = collections.Counter(key(row) for row in rows["original"] if row["kind"] != "chosen")
    chosen = collections.Counter(key(row) for row in rows["original"] if row["kind"] == "chosen")
    assert collections.Counter(key(row) for row in rows["forget"]) == rejected
    assert collections.Counter(key(row) for row in rows["retain"]) == chosen
    assert all(row["label"] is False and row["kind"] in REJECTED_KINDS for row in rows["forget"])
    assert all(row["label"] is True and row["kind"] == "chosen" for row in rows["retain"])


@pytest.mark.parametrize("kwargs", [{}, {"seed": 3, "n_prompts": 100, "responses_per_prompt": 4}])
def test_rejected_fraction_and_responses_per_prompt(kwargs):
    original = make_u2a_task(**kwargs)["original"].to_list()
    fraction = sum(row["kind"] != "chosen" for row in original) / len(original)
    assert 0.60 <= fraction <= 0.70
    per_prompt = collections.defaultdict(list)
    for row in original:
        per_prompt[row["prompt_id"]].append(row)
    for responses in per_prompt.values():
        assert len(responses) >= 2
        assert len({row["completion"] for row in responses}) == len(responses)  # distinct answers per prompt
        assert any(row["kind"] == "chosen" for row in responses)
        assert any(row["kind"] != "chosen" for row in responses)


def test_every_kind_present_in_the_planned_mixture(task):
    counts = collections.Counter(row["kind"] for row in task["forget"].to_list())
    assert set(counts) == set(REJECTED_KINDS)
    assert counts == {"harmful": 117, "low_quality": 70, "near_copy": 47}  # 234 rejected at 50/30/20, exact
    align = collections.Counter(row["kind"] for row in task["alignment"].to_list())
    assert align == {"harmful": 64, "low_quality": 16}
    assert set(collections.Counter(row["kind"] for row in task["test_pairs"].to_list())) == {"harmful", "low_quality"}
    only = make_u2a_task(kinds={"near_copy": 1.0})["forget"].to_list()
    assert {row["kind"] for row in only} == {"near_copy"}


def test_kinds_have_their_properties(task):
    rows = _rows(task)
    chosen_texts = {row["completion"] for row in rows["retain"]}
    chosen_texts |= {row["chosen"] for name in ("alignment", "test_pairs") for row in rows[name]}
    for row in rows["original"]:
        text = row["completion"]
        assert contains_harm_words(text) == (row["kind"] == "harmful"), row
        if row["kind"] == "near_copy":
            assert text not in chosen_texts
            assert text.endswith((".", "!"))
    for name in ("alignment", "test_pairs"):
        for row in rows[name]:
            assert not contains_harm_words(row["chosen"])
            assert contains_harm_words(row["rejected"]) == (row["kind"] == "harmful")
            assert row["chosen"] != row["rejected"]
    truncated = [row for row in rows["original"] if row["kind"] == "low_quality" and row["completion"][-1] not in ".!?"]
    assert truncated, "some low_quality answers are truncated"


def test_alignment_rejected_strings_are_not_forget_strings(task):
    forget = {row["completion"] for row in task["forget"].to_list()}
    assert not forget & {row["rejected"] for row in task["alignment"].to_list()}


def test_conversational_variant_has_message_lists(task):
    conv = make_u2a_task(seed=0, conversational=True)
    plain = _rows(task)
    for name in SPLITS:
        for row, ref in zip(conv[name].to_list(), plain[name], strict=True):
            assert row["prompt"] == [{"role": "user", "content": ref["prompt"]}]
            for key in ("completion", "chosen", "rejected"):
                if key in ref:
                    assert row[key] == [{"role": "assistant", "content": ref[key]}]
            assert row["prompt_id"] == ref["prompt_id"] and row.get("kind") == ref.get("kind")


def test_default_corpus_is_deterministic_and_covers_the_vocabulary(task):
    corpus = default_corpus(0)
    assert corpus == default_corpus(0) and all(isinstance(text, str) and text for text in corpus)
    vocab = {word for text in corpus for word in text.split()}
    rows = _rows(task)
    words = {word for row in rows["original"] for word in (row["prompt"] + " " + row["completion"]).split()}
    words |= {word for row in rows["alignment"] for word in (row["chosen"] + " " + row["rejected"]).split()}

    # Punctuation attaches differently to words; compare bare words.
    def strip(ws):
        return {w.strip(".,!?:;").lower() for w in ws} - {""}

    assert strip(words) <= strip(vocab)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="n_prompts"):
        make_u2a_task(n_prompts=1000)
    with pytest.raises(ValueError, match="rejected_fraction"):
        make_u2a_task(rejected_fraction=1.0)
    with pytest.raises(ValueError, match="unknown kinds"):
        make_u2a_task(kinds={"toxic": 1.0})
    with pytest.raises(ValueError, match="non-negative"):
        make_u2a_task(kinds={"harmful": -1.0, "near_copy": 2.0})
    with pytest.raises(ValueError, match="at least 1"):
        make_u2a_task(n_prompts=4, alignment_fraction=0.1)
    with pytest.raises(ValueError, match="responses_per_prompt"):
        make_u2a_task(responses_per_prompt=1)


def test_make_training_splits_for_the_script(task):
    splits = make_training_splits(seed=0)
    assert {"train", "test", "alignment"} <= set(splits)
    train = splits["train"].to_list()
    forget, retain = task["forget"].to_list(), task["retain"].to_list()
    assert train == forget + retain  # negative i of train is forget row i
    assert splits["test"].to_list() == task["test_pairs"].to_list()
    assert splits["alignment"].to_list() == task["alignment"].to_list()
