"""Data: the shipped data sets, seeded stratified splits, and client partitions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hfedmoe.data import TextDataset, load_dataset, partition_indices
from hfedmoe.data.datasets import stratified_split
from hfedmoe.data.multiple_choice import parse_options
from hfedmoe.data.partition import partition_key
from hfedmoe.data.tokenized import (
    IGNORE_INDEX,
    encode_heads,
    shuffled_batches,
    tokenize_choices,
)
from hfedmoe.foundation.assets import shipped_path
from hfedmoe.foundation.config import DataConfig, ModelConfig
from hfedmoe.foundation.errors import HFedMoEError
from hfedmoe.model import load_tokenizer


def test_bbc_news_is_read_with_sorted_class_names():
    split = load_dataset(DataConfig(), seed=0)
    assert len(split.train) + len(split.test) == 2225
    assert split.train.label_names == ("business", "entertainment", "politics", "sports", "tech")
    counts = np.bincount(np.concatenate([split.train.labels, split.test.labels]))
    assert counts.tolist() == [510, 386, 417, 511, 401]


def test_stratified_split_by_hand():
    labels = np.array([0] * 10 + [1] * 5)
    train, test = stratified_split(labels, 0.2, seed=1)
    assert sorted(np.concatenate([train, test]).tolist()) == list(range(15))
    assert np.bincount(labels[test]).tolist() == [2, 1]  # 20% of 10, round(20% of 5)


@pytest.mark.parametrize("partitioner", ["dirichlet", "iid"])
def test_partitions_are_disjoint_covering_and_deterministic(partitioner):
    labels = np.random.default_rng(0).integers(0, 5, size=500)
    cfg = DataConfig(partitioner=partitioner, dirichlet_alpha=0.5, min_partition_size=10)
    parts = partition_indices(labels, 6, cfg, seed=7)
    everything = np.concatenate(parts)
    assert len(everything) == len(np.unique(everything)) == 500
    assert min(len(p) for p in parts) >= 10
    again = partition_indices(labels, 6, cfg, seed=7)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    other = partition_indices(labels, 6, cfg, seed=8)
    assert any(not np.array_equal(a, b) for a, b in zip(parts, other, strict=True))


def test_dirichlet_skews_labels_more_for_smaller_alpha():
    labels = np.repeat(np.arange(5), 200)

    def mean_max_share(alpha):
        parts = partition_indices(labels, 5, DataConfig(dirichlet_alpha=alpha), seed=0)
        return np.mean([np.bincount(labels[p], minlength=5).max() / len(p) for p in parts])

    assert mean_max_share(0.1) > mean_max_share(100.0) + 0.2


def test_partition_too_small_is_an_input_error():
    with pytest.raises(HFedMoEError, match="min_partition_size"):
        partition_indices(np.zeros(20, dtype=int), 5, DataConfig(min_partition_size=10), seed=0)


def test_a_dirichlet_draw_that_never_fits_says_what_to_change(recwarn):
    """At alpha 0.01 most draws give a client (almost) nothing: after flwr-datasets' 10
    resamples, one line naming the field, the numbers and the ways out, and no resampling
    warnings on the way."""
    labels = np.repeat(np.arange(4), 25)
    cfg = DataConfig(dirichlet_alpha=0.01, min_partition_size=10)
    with pytest.raises(HFedMoEError) as error:
        partition_indices(labels, 8, cfg, seed=0)
    assert str(error.value) == (
        "data.dirichlet_alpha: 10 Dirichlet draws at alpha 0.01 each left a client below "
        "data.min_partition_size (10 rows) with 100 training rows for 8 clients (seed 0); "
        "expected a larger alpha, a smaller min_partition_size, more rows or another seed"
    )
    assert not [w for w in recwarn if "min_partition_size" in str(w.message)]


def test_shuffled_batches_cycle_through_epochs():
    rng = np.random.default_rng(0)
    batches = list(shuffled_batches(5, 2, steps=5, rng=rng))
    assert [len(b) for b in batches] == [2, 2, 2, 2, 2]
    assert sorted(np.concatenate(batches[:2]).tolist()) == sorted(set(np.concatenate(batches[:2])))


# --- setting (b): Rotten Tomatoes, clients formed from movies --------------------------------


def test_rotten_tomatoes_is_the_fresh_and_rotten_reviews_grouped_by_movie():
    split = load_dataset(DataConfig(dataset="rotten_tomatoes"), seed=0)
    both = np.concatenate([split.train.labels, split.test.labels])
    assert split.train.label_names == ("fresh", "rotten")
    assert np.bincount(both).tolist() == [7403, 5405]  # the 1,097 plot summaries are left out
    assert len(split.train.group_names) == 508
    assert split.train.groups is not None and split.train.groups.max() < 508


def test_rotten_tomatoes_file_without_the_columns_is_an_input_error(tmp_path):
    bad = tmp_path / "reviews.csv"
    bad.write_text("category,review\nfresh,great\n")
    with pytest.raises(HFedMoEError, match=r"data.path: .* lacks the column\(s\) movie_name, text"):
        load_dataset(DataConfig(dataset="rotten_tomatoes", path=str(bad)), seed=0)


def test_natural_partition_deals_out_whole_groups():
    ids = np.repeat(np.arange(10), [1, 2, 3, 4, 5, 6, 7, 8, 9, 10])  # 55 rows of 10 movies
    cfg = DataConfig(dataset="rotten_tomatoes", partitioner="natural")
    parts = partition_indices(ids, 3, cfg, seed=0)
    assert sorted(np.concatenate(parts).tolist()) == list(range(55))
    owners = [{int(g) for g in ids[p]} for p in parts]
    assert sorted(len(o) for o in owners) == [3, 3, 4]  # 10 movies in runs of 4, 3, 3
    assert set.union(*owners) == set(range(10)) and sum(len(o) for o in owners) == 10
    again = partition_indices(ids, 3, cfg, seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))


def test_natural_partition_needs_a_group_per_client():
    cfg = DataConfig(dataset="rotten_tomatoes", partitioner="natural")
    with pytest.raises(HFedMoEError, match=r"federation.num_clients: 4 clients but only 3"):
        partition_indices(np.array([0, 1, 2, 2]), 4, cfg, seed=0)


def test_natural_partition_needs_a_grouped_dataset():
    with pytest.raises(ValueError, match=r"data.dataset: 'bbc_news' has no groups"):
        DataConfig(dataset="bbc_news", partitioner="natural")


# --- setting (c): four multiple-choice tasks, clients mostly of one task --------------------


def test_options_are_parsed_with_the_right_answer_by_letter():
    assert parse_options("\nA. bank\nB. mall", "B. mall") == (("bank", "mall"), 1)
    assert parse_options("A. x\nB. y\nC. z", "C. z") == (("x", "y", "z"), 2)
    assert parse_options("A. x\nB. y", "D. w") is None  # the answer is not an option


def test_qa_mix_reads_four_tasks_with_their_choices():
    cfg = DataConfig(dataset="qa_mix", task="multiple-choice")
    split = load_dataset(cfg, seed=0)
    train = split.train
    groups = np.concatenate([train.groups, split.test.groups])
    assert train.group_names == ("boolq", "commonsenseqa", "piqa", "siqa")
    assert np.bincount(groups).tolist() == [12697, 1221, 1500, 1954]
    assert np.bincount(split.test.groups).tolist() == [2539, 244, 300, 391]  # 20% of each task
    widths = {
        g: {len(train.choices[i]) for i in np.flatnonzero(train.groups == g)} for g in range(4)
    }
    assert widths[0] == {2} and widths[2] == {2} and widths[3] == {3}
    boolq = int(np.flatnonzero(train.groups == 0)[0])
    assert train.choices[boolq] == (" no", " yes") and train.texts[boolq].endswith("?\nAnswer:")
    assert all(0 <= label < len(c) for label, c in zip(train.labels, train.choices, strict=True))


def test_qa_mix_dirichlet_over_tasks_gives_clients_mostly_one_task():
    cfg = DataConfig(
        dataset="qa_mix",
        task="multiple-choice",
        partition_by="group",
        dirichlet_alpha=0.1,
        max_examples_per_group=500,
    )
    train = load_dataset(cfg, seed=0).train
    assert np.bincount(train.groups).tolist() == [400, 400, 400, 400]  # 500 each, 80% train
    parts = partition_indices(partition_key(train, cfg), 8, cfg, seed=0)
    top_share = [np.bincount(train.groups[p], minlength=4).max() / len(p) for p in parts]
    assert np.mean(top_share) > 0.8


def test_a_shipped_data_set_is_its_own_task():
    with pytest.raises(ValueError, match=r"data.task: data set 'bbc_news' is classification"):
        DataConfig(dataset="bbc_news", task="multiple-choice")
    with pytest.raises(ValueError, match=r"data.task: data set 'qa_mix' is multiple-choice"):
        DataConfig(dataset="qa_mix")
    DataConfig(dataset="bbc_news", task="language-modeling")  # the texts of a classification set


def test_choices_are_tokenised_as_prompt_then_answer_with_the_prompt_cut_from_its_start():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(shipped_path("all-MiniLM-L6-v2"))
    data = TextDataset(
        ["one two three four five six seven eight nine ten", "question"],
        np.array([1, 0]),
        ("A", "B"),
        choices=[(" yes", " no maybe"), (" red", " blue")],
    )
    tok = tokenize_choices(data, tokenizer, max_length=8)
    ids = [tokenizer(w, add_special_tokens=False)["input_ids"] for w in ("no maybe", "red")]
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    # 8 tokens: [CLS], the prompt's last words and [SEP] (room = 8 - 2 answer tokens), answer 1
    assert tok.input_ids[0][0] == cls and tok.input_ids[0][-3:] == [sep, *ids[0]]
    assert len(tok.input_ids[0]) == 8 and tok.answer_start == [6, 3]
    assert tokenizer.decode(tok.input_ids[0][1:5]) == "seven eight nine ten"
    assert tok.input_ids[1][-1:] == ids[1] and tok.choices[1][0] == ids[1]
    labels = tok.batch(np.array([0, 1]))["labels"]
    assert labels[0].tolist() == [IGNORE_INDEX] * 6 + ids[0]  # loss on the answer only
    assert labels[1].tolist() == [IGNORE_INDEX] * 3 + ids[1] + [IGNORE_INDEX] * 4  # padding
    inputs, batch = tok.inputs(np.array([0, 1])), tok.batch(np.array([0, 1]))
    assert inputs.keys() == {"input_ids", "attention_mask"}  # what router-only passes feed
    assert all(torch.equal(inputs[k], batch[k]) for k in inputs)
    assert batch["attention_mask"][1].tolist() == [1] * 4 + [0] * 4


# ---- long texts are tokenised from their heads ----------------------------------------------

_PIECES = [
    "the",
    "news",
    "café",
    "e\u0301",
    "中文",
    "😀",
    "don't",
    "3.14",
    ",",
    "...",
    "[SEP]",
    "x" * 40,
    " ",
    "  ",
    "\n",
    "\t ",
    "\u00a0",
]


@pytest.fixture(scope="module")
def shipped_tokenizers():
    """WordPiece (MiniLM) and byte-level BPE (SmolLM2)."""
    names = ("all-MiniLM-L6-v2", "SmolLM2-135M-Instruct")
    return [load_tokenizer(ModelConfig(name_or_path=n)) for n in names]


@settings(max_examples=60, deadline=None)
@given(
    words=st.lists(st.sampled_from(_PIECES), min_size=0, max_size=400),
    glue=st.lists(st.sampled_from([" ", "", "  ", "\n"]), min_size=400, max_size=400),
    max_length=st.sampled_from([4, 8, 16, 33]),
)
def test_long_texts_tokenised_from_their_heads_give_the_whole_texts_ids(
    shipped_tokenizers, words, glue, max_length
):
    """Whatever the text (words, whitespace runs, accents, CJK, emoji, special-token strings,
    one long word), the ids are those of tokenising it whole and truncating."""
    text = "".join(w + g for w, g in zip(words, glue, strict=False))
    texts = [text, text[: len(text) // 2], "short"]
    for tokenizer in shipped_tokenizers:
        whole = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
        assert encode_heads(tokenizer, texts, max_length) == [list(r) for r in whole]


@pytest.mark.parametrize(
    "text",
    [
        "a " + "x" * 150,  # a word the cut goes through: WordPiece reads over 100 letters as [UNK]
        "one two " + "ab" * 100,
        "x" * 500,  # no whitespace to cut at
        "word   " * 40,  # runs of whitespace
        "中文" * 200,  # no whitespace between words
    ],
)
def test_a_word_the_cut_goes_through_never_reaches_the_ids(shipped_tokenizers, text):
    for tokenizer in shipped_tokenizers:
        whole = tokenizer([text], truncation=True, max_length=8)["input_ids"]
        assert encode_heads(tokenizer, [text], 8) == [list(whole[0])]


def test_a_tokenizer_that_keeps_the_tail_reads_texts_whole(shipped_tokenizers):
    tokenizer = shipped_tokenizers[0]
    tokenizer.truncation_side = "left"
    try:
        text = "first words " + "middle " * 300 + "last words"
        whole = tokenizer([text], truncation=True, max_length=8)["input_ids"]
        assert encode_heads(tokenizer, [text], 8) == [list(whole[0])]
    finally:
        tokenizer.truncation_side = "right"
