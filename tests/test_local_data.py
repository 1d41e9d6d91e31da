"""A user's own data: local CSV, JSON Lines, Parquet and saved data sets, read through the
columns the config names, for every task; bad files stop the run with one line before anything
is written; the examples under examples/ run end to end on tiny models."""

from __future__ import annotations

import json
import shutil
import tomllib
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest
import tomli_w

from hfedmoe.data import load_dataset
from hfedmoe.data.tokenized import IGNORE_INDEX, tokenize_chat
from hfedmoe.engines.embedded import run_embedded
from hfedmoe.federation.client_app import app as client_app
from hfedmoe.federation.server_app import app as server_app
from hfedmoe.foundation.config import DataConfig, validate
from hfedmoe.results import read_metrics
from hfedmoe.results.recorder import ACCURACY_IS

from .support.cli import invoke_cli
from .support.configs import tiny_raw

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
TICKETS = EXAMPLES / "data" / "support_tickets.csv"


def _local(path: Path | str, **data) -> DataConfig:
    return DataConfig(dataset="local", path=str(path), **data)


def _write_csv(path: Path, header: str, *rows: str) -> Path:
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def _jsonl(*rows: dict) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


# --- reading: every format gives the same rows ------------------------------------------


def test_a_csv_of_texts_and_labels_is_a_classification_data_set(tmp_path):
    csv = _write_csv(
        tmp_path / "t.csv", "text,label", "good film,pos", "dull plot,neg", "great cast,pos"
    )
    split = load_dataset(_local(csv, test_fraction=0.34), seed=0)
    train, test = split.train, split.test
    assert train.label_names == ("neg", "pos")  # sorted distinct labels
    assert sorted(train.texts + test.texts) == ["dull plot", "good film", "great cast"]
    assert len(test) == 1


def test_csv_jsonl_parquet_and_saved_data_sets_read_the_same(tmp_path):
    import datasets

    table = datasets.load_dataset("csv", data_files=str(TICKETS), split="train")
    table.to_json(tmp_path / "t.jsonl")
    table.to_parquet(tmp_path / "t.parquet")
    table.save_to_disk(tmp_path / "saved")
    columns = {"text": "subject", "text_pair": "body", "label": "team", "group": "channel"}
    read = {
        name: load_dataset(_local(path, columns=columns), seed=0).train
        for name, path in [
            ("csv", TICKETS),
            ("jsonl", tmp_path / "t.jsonl"),
            ("parquet", tmp_path / "t.parquet"),
            ("saved", tmp_path / "saved"),
        ]
    }
    first = read["csv"]
    assert first.label_names == ("billing", "shipping", "technical")
    assert first.group_names == ("chat", "email", "phone")
    assert first.pairs is not None and len(first) == 72 - 3 * round(24 * 0.2)  # per class
    for other in read.values():
        assert other.texts == first.texts and other.pairs == first.pairs
        assert other.labels.tolist() == first.labels.tolist()
        assert other.groups.tolist() == first.groups.tolist()


def test_a_saved_dataset_dict_brings_its_own_test_split(tmp_path):
    import datasets

    rows = {"text": ["a b", "c d", "e f", "g h"], "label": [0, 1, 0, 1]}
    test = {"text": ["i j", "k l"], "label": [1, 1]}
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_dict(rows), "test": datasets.Dataset.from_dict(test)}
    ).save_to_disk(tmp_path / "dd")
    split = load_dataset(_local(tmp_path / "dd"), seed=0)
    assert split.train.texts == ["a b", "c d", "e f", "g h"]  # all of train trains
    assert split.test.texts == ["i j", "k l"] and split.test.labels.tolist() == [1, 1]
    assert split.train.label_names == ("0", "1")  # integer labels without names


def test_a_test_file_keeps_the_training_files_label_and_group_ids(tmp_path):
    train = _write_csv(tmp_path / "a.csv", "text,label,who", "x,b,ann", "y,a,bob", "z,b,ann")
    test = _write_csv(tmp_path / "b.csv", "text,label,who", "w,b,cid", "v,a,bob")
    split = load_dataset(_local(train, test_path=str(test), columns={"group": "who"}), seed=0)
    assert split.train.label_names == split.test.label_names == ("a", "b")
    assert split.test.labels.tolist() == [1, 0]
    assert split.train.group_names == ("ann", "bob")
    assert split.test.group_names == ("ann", "bob", "cid")  # a test-only group is appended
    assert split.test.groups.tolist() == [2, 1]


def test_label_names_fix_the_ids_and_integer_labels_index_them(tmp_path):
    named = _write_csv(tmp_path / "n.csv", "text,label", "x,low", "y,high", "z,mid")
    data = load_dataset(_local(named, label_names=["low", "mid", "high"]), seed=0)
    full = sorted(
        zip(
            data.train.texts + data.test.texts, [*data.train.labels, *data.test.labels], strict=True
        )
    )
    assert full == [("x", 0), ("y", 2), ("z", 1)]
    ids = _write_csv(tmp_path / "i.csv", "text,label", "x,0", "y,2", "z,1")
    data = load_dataset(_local(ids, label_names=["low", "mid", "high"]), seed=0)
    assert data.train.label_names == ("low", "mid", "high")


def test_a_classlabel_column_names_its_classes(tmp_path):
    import datasets

    table = datasets.Dataset.from_dict({"text": ["x", "y", "z", "w"], "label": [1, 0, 1, 0]})
    table = table.cast_column("label", datasets.ClassLabel(names=["spam", "ham"]))
    table.save_to_disk(tmp_path / "s")
    data = load_dataset(_local(tmp_path / "s", test_fraction=0.5), seed=0)
    assert data.train.label_names == ("spam", "ham")


def test_multiple_choice_answers_by_text_or_index(tmp_path):
    path = tmp_path / "q.jsonl"
    rows = [
        {"question": "2 + 2 =", "choices": ["3", "4"], "answer": "4"},
        {"question": "Sky?", "choices": ["blue", "  green "], "answer": 0},
        {"question": "Odd?", "choices": ["1", "2", "4"], "answer": "1"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = load_dataset(_local(path, task="multiple-choice", test_fraction=0.3), seed=0)
    everything = {
        t: (c, int(a))
        for part in (data.train, data.test)
        for t, c, a in zip(part.texts, part.choices, part.labels, strict=True)
    }
    assert everything["2 + 2 ="] == ((" 3", " 4"), 1)  # answers continue the prompt
    assert everything["Sky?"] == ((" blue", " green"), 0)
    assert everything["Odd?"] == ((" 1", " 2", " 4"), 0)
    assert data.train.label_names == ("A", "B", "C")


def test_prompt_and_response_columns_are_a_two_turn_chat(tmp_path):
    csv = _write_csv(tmp_path / "p.csv", "q,a", "Hi?,Hello.", "Why?,Because.")
    data = load_dataset(
        _local(
            csv, task="instruction", test_fraction=0.5, columns={"prompt": "q", "response": "a"}
        ),
        seed=0,
    )
    chats = data.train.conversations + data.test.conversations
    assert sorted(c[1]["content"] for c in chats) == ["Because.", "Hello."]
    assert all([m["role"] for m in c] == ["user", "assistant"] for c in chats)


# --- instruction tuning: the chat template, loss on the answer only ----------------------

TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} </s>{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def _token_ids(encoded) -> list[int]:
    return list(encoded["input_ids"] if isinstance(encoded, Mapping) else encoded)


def _chat_tokenizer(template: str | None = TEMPLATE):
    from transformers import AutoTokenizer

    from hfedmoe.foundation.assets import shipped_path

    tokenizer = AutoTokenizer.from_pretrained(shipped_path("all-MiniLM-L6-v2"))
    tokenizer.chat_template = template
    return tokenizer


def test_a_chat_trains_on_its_answer_and_its_end_of_turn_only():
    from hfedmoe.data.text import TextDataset

    chat = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "boil an egg"},
        {"role": "assistant", "content": "seven minutes"},
    ]
    data = TextDataset(["x"], np.zeros(1, dtype=np.int64), (), conversations=[chat])
    tokenizer = _chat_tokenizer()
    tokens = tokenize_chat(data, tokenizer, max_length=64)
    batch = tokens.batch(np.array([0]))
    trained = batch["labels"][0][batch["labels"][0] != IGNORE_INDEX].tolist()
    whole, prompt = (
        _token_ids(tokenizer.apply_chat_template(c, add_generation_prompt=g))
        for c, g in ((chat, False), (chat[:-1], True))
    )
    answer = whole[len(prompt) :]
    assert trained == list(answer)
    assert tokenizer.decode(trained).replace(" ", "").startswith("sevenminutes")
    # a long prompt is cut from its start; the answer survives whole
    long = [{"role": "user", "content": "word " * 200}, chat[-1]]
    data = TextDataset(["x"], np.zeros(1, dtype=np.int64), (), conversations=[long])
    tokens = tokenize_chat(data, tokenizer, max_length=32)
    assert len(tokens.input_ids[0]) == 32
    assert tokens.input_ids[0][tokens.answer_start[0] :] == list(answer)


def test_instruction_data_needs_a_chat_template():
    from hfedmoe.data.text import TextDataset
    from hfedmoe.foundation.errors import HFedMoEError

    chat = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    data = TextDataset(["x"], np.zeros(1, dtype=np.int64), (), conversations=[chat])
    with pytest.raises(HFedMoEError, match="needs a tokenizer with a chat template"):
        tokenize_chat(data, _chat_tokenizer(None), max_length=32)


def test_a_chat_file_with_only_a_messages_column_needs_no_column_named(tmp_path):
    chat = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]
    path = tmp_path / "chats.jsonl"
    path.write_text(_jsonl(*({"messages": chat} for _ in range(6))))
    split = load_dataset(_local(path, task="instruction", test_fraction=0.5), seed=0)
    assert split.train.conversations[0] == chat
    assert len(split.train) + len(split.test) == 6


def test_the_chat_jobs_file_is_boolq_as_chats_read_as_the_config_reads_it(tmp_path):
    """experiments/chat_data.py (configs/chat_sft.toml's data): the same rows for a seed, each a
    system, user and assistant turn answering yes or no, read by the local loader."""
    import importlib.util

    script = REPO / "experiments" / "chat_data.py"
    spec = importlib.util.spec_from_file_location("chat_data", script)
    chat_data = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(chat_data)
    rows = chat_data.chats(10, seed=3)
    assert rows == chat_data.chats(10, seed=3) and rows != chat_data.chats(10, seed=4)
    assert {r["messages"][2]["content"] for r in rows} <= {"Yes.", "No."}
    assert [m["role"] for m in rows[0]["messages"]] == ["system", "user", "assistant"]
    path = tmp_path / "chats.jsonl"
    path.write_text(_jsonl(*rows))
    split = load_dataset(_local(path, task="instruction", test_fraction=0.2), seed=0)
    assert len(split.train) + len(split.test) == 10
    assert split.train.conversations[0] in [r["messages"] for r in rows]


# --- bad data: one line, exit 2, nothing written ------------------------------------------


@pytest.mark.parametrize(
    ("name", "content", "data", "fragment"),
    [
        ("gone.csv", None, {}, "data.path: '"),
        ("empty.csv", "text,label\n", {}, "has no rows"),
        ("t.csv", "body,label\nx,a\ny,b\n", {}, "data.columns.text: "),
        ("t.csv", "text,label\nx,a\ny,b\n", {"columns": {"label": "team"}}, "no column 'team'"),
        (
            "t.csv",
            "text,label\nx,a\ny,zz\n",
            {"label_names": ["a", "b"]},
            "data.label_names: ",
        ),
        (
            "c.jsonl",
            '{"messages": "hello"}\n{"messages": "there"}\n',
            {"task": "instruction", "columns": {"messages": "messages"}},
            "data.columns.messages: ",
        ),
        ("t.xlsx", "whatever", {}, "is not a CSV, TSV, JSON Lines or Parquet file"),
        (
            "q.jsonl",
            _jsonl({"question": "Sky?", "choices": ["a", "b"], "answer": 0}, {"answer": 1}),
            {"task": "multiple-choice"},
            "data.columns.question: '{path}' row 2: 'question' is None, not a question",
        ),
        (
            "q.jsonl",
            _jsonl({"question": "Sky?", "answer": 1}, {"question": "Sea?", "choices": ["a", "b"]}),
            {"task": "multiple-choice"},
            "data.columns.choices: '{path}' row 1: None is not a list of 2+ non-empty answers",
        ),
        (
            "q.jsonl",
            _jsonl({"question": "Sky?", "choices": ["blue", " "], "answer": 0}),
            {"task": "multiple-choice"},
            "data.columns.choices: '{path}' row 1: ['blue', ' '] is not a list of 2+ non-empty",
        ),
        (
            "q.jsonl",
            _jsonl({"question": "Sky?", "choices": ["blue", "red"], "answer": 2}),
            {"task": "multiple-choice"},
            "data.columns.answer: '{path}' row 1: 2 is neither one of the choices nor their index",
        ),
    ],
)
def test_bad_local_data(name, content, data, fragment, tiny_bert_dir, tiny_llama_dir, tmp_path):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    decoder = data.get("task") in ("instruction", "multiple-choice")
    _assert_refused(
        data,
        path,
        fragment.format(path=path),
        tiny_llama_dir if decoder else tiny_bert_dir,
        tmp_path,
    )


def _assert_refused(data: dict, path: Path, fragment: str, model: Path, tmp_path: Path) -> None:
    """A run of ``data`` at ``path`` stops with one line holding ``fragment``, exit status 2,
    before its run directory exists."""
    raw = tiny_raw(model)
    raw["data"] = {"dataset": "local", "path": str(path), **data}
    cfg = tmp_path / "bad.toml"
    cfg.write_text(tomli_w.dumps(raw))
    proc = invoke_cli("run", str(cfg), "-o", str(tmp_path / "r"))
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hfedmoe: error: "), proc.stderr
    assert fragment in lines[0], proc.stderr
    assert not (tmp_path / "r").exists()


def _saved(tmp_path: Path, labels: tuple[int, ...] = (0, 1) * 4) -> Path:
    """Texts with a ClassLabel column of ``labels`` (ham, spam), saved with ``save_to_disk``."""
    import datasets

    texts = [f"text {i}" for i in range(len(labels))]
    table = datasets.Dataset.from_dict({"text": texts, "label": list(labels)})
    table = table.cast_column("label", datasets.ClassLabel(names=["ham", "spam"]))
    table.save_to_disk(tmp_path / "saved")
    return tmp_path / "saved"


def _arrow(saved: Path) -> Path:
    return next(saved.glob("*.arrow"))


def _cut(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize(
    ("damage", "fragment"),
    [
        (
            lambda s: _arrow(s).unlink(),
            "No such file or directory: '{saved}/data-00000-of-00001.arrow'",
        ),
        (lambda s: _cut(_arrow(s)), "'{saved}/data-00000-of-00001.arrow' is cut short"),
        (
            lambda s: (s / "state.json").write_text("{not json"),
            "'{saved}/state.json' is not readable JSON",
        ),
        (
            lambda s: (s / "dataset_info.json").write_bytes(b"\xff\xfe"),
            "'{saved}/dataset_info.json' is not readable JSON",
        ),
        (
            lambda s: (s / "state.json").unlink(),
            "'{saved}' is not a data set saved with save_to_disk",
        ),
    ],
    ids=[
        "arrow file missing",
        "arrow file cut",
        "state.json broken",
        "dataset_info.json binary",
        "no state.json",
    ],
)
def test_a_damaged_saved_data_set(damage, fragment, tiny_bert_dir, tmp_path):
    saved = _saved(tmp_path)
    damage(saved)
    _assert_refused({}, saved, fragment.format(saved=saved), tiny_bert_dir, tmp_path)


def test_an_unlabelled_classlabel_row_is_refused_not_read_as_the_last_class(
    tiny_bert_dir, tmp_path
):
    """Hugging Face marks a row without a label -1; Python's indexing would make it 'spam'."""
    saved = _saved(tmp_path, labels=(0, 1, 0, 1, -1, 1, 0, 1))
    fragment = f"data.columns.label: '{saved}' row 5: 'label' is -1, not a class of its ClassLabel"
    _assert_refused({}, saved, fragment, tiny_bert_dir, tmp_path)


def test_a_local_data_set_must_name_its_file():
    with pytest.raises(ValueError, match=r"data\.path: a local data set needs"):
        DataConfig(dataset="local")
    with pytest.raises(ValueError, match=r"data\.test_path: only a local data set"):
        DataConfig(test_path="x.csv")


# --- the examples, end to end on tiny models ----------------------------------------------


@pytest.fixture(scope="session")
def tiny_chat_llama_dir(tiny_llama_dir, tmp_path_factory) -> Path:
    """The tiny Llama with a chat template, as an instruct model's tokenizer has."""
    from transformers import AutoTokenizer

    directory = tmp_path_factory.mktemp("tiny-chat-llama")
    shutil.copytree(tiny_llama_dir, directory, dirs_exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(directory)
    return directory


def _example(name: str, model_dir: Path, moe_layers: list[int]) -> dict:
    raw = tomllib.loads((EXAMPLES / "configs" / f"{name}.toml").read_text())
    for key in ("path", "test_path"):
        if key in raw["data"]:
            raw["data"][key] = str(REPO / raw["data"][key])
    raw["model"].update(name_or_path=str(model_dir), moe_layers=moe_layers)
    raw["federation"]["rounds"] = 2
    raw["federation"]["check_wire"] = True
    raw["threads"] = 1
    return raw


@pytest.mark.parametrize(
    ("name", "model"),
    [
        ("local_classification", "bert"),
        ("local_language_modeling", "llama"),
        ("local_instruction", "llama"),
        ("local_multiple_choice", "llama"),
    ],
)
def test_each_example_config_runs_on_its_data(
    name, model, tiny_bert_dir, tiny_chat_llama_dir, tmp_path
):
    model_dir, layers = (tiny_bert_dir, [1]) if model == "bert" else (tiny_chat_llama_dir, [1, 2])
    cfg = validate(_example(name, model_dir, layers))
    run_embedded(cfg, str(tmp_path / "run"), server_app, client_app)
    records = read_metrics(tmp_path / "run")
    last = records[-1]
    assert last["round"] == 2 and last["clients_failed"] == 0
    assert np.isfinite(last["test_loss"])
    if cfg.data.task in ("language-modeling", "instruction"):
        assert last["test_perplexity"] == pytest.approx(np.exp(last["test_loss"]))
        groups = {"language-modeling": {"coast", "forest", "mountain"}}.get(
            cfg.data.task, {"baking", "stove"}
        )
        assert set(last["test_loss_by_group"]) == groups
    if cfg.data.task == "multiple-choice":
        assert set(last["test_accuracy_by_group"]) == {"Americas", "Asia", "Europe"}
    # the summary says what its accuracy means for the task, and its perplexity where there is one
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["accuracy_is"] == ACCURACY_IS[cfg.data.task]
    assert ("final_test_perplexity" in summary) == ("test_perplexity" in last)


def _tickets_as(fmt: str, tmp_path: Path) -> dict:
    """The support tickets example as a CSV, a JSON Lines file or a saved DatasetDict (with
    its test split), and the data section that reads it."""
    import datasets

    if fmt == "csv":
        return {
            "path": str(TICKETS),
            "test_path": str(TICKETS.with_name("support_tickets_test.csv")),
        }
    train, test = (
        datasets.load_dataset("csv", data_files=str(TICKETS.with_name(name)), split="train")
        for name in ("support_tickets.csv", "support_tickets_test.csv")
    )
    if fmt == "jsonl":
        train.to_json(tmp_path / "tickets.jsonl")
        return {"path": str(tmp_path / "tickets.jsonl"), "test_fraction": 0.25}
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(tmp_path / "tickets")
    return {"path": str(tmp_path / "tickets")}


# jsonl in the default selection; the other formats load through the same path (CI time).
@pytest.mark.parametrize(
    "fmt",
    [
        pytest.param("csv", marks=pytest.mark.slow),
        "jsonl",
        pytest.param("saved", marks=pytest.mark.slow),
    ],
)
def test_a_users_data_runs_through_run_and_compare_from_its_config_alone(
    fmt, tiny_bert_dir, tmp_path
):
    raw = _example("local_classification", tiny_bert_dir, [1])
    raw["federation"]["rounds"] = 1
    raw["data"] = {k: v for k, v in raw["data"].items() if k not in ("path", "test_path")}
    raw["data"].update(_tickets_as(fmt, tmp_path))
    config = tmp_path / "mine.toml"
    config.write_text(tomli_w.dumps(raw))
    proc = invoke_cli("run", str(config), "-o", str(tmp_path / "run"), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert len(read_metrics(tmp_path / "run")) == 2  # round 0 and 1
    proc = invoke_cli(
        "compare",
        str(config),
        "--methods",
        "fedavg,hfedmoe",
        "-o",
        str(tmp_path / "grid"),
        "--no-progress",
    )
    assert proc.returncode == 0, proc.stderr
    for method in ("fedavg", "hfedmoe"):
        assert len(read_metrics(tmp_path / "grid" / method / "seed0")) == 2
