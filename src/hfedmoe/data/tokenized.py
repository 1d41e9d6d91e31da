"""Tokenised examples and the mini-batches drawn from them."""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from hfedmoe.data.text import TextDataset
from hfedmoe.foundation.config import ExperimentConfig
from hfedmoe.foundation.errors import HFedMoEError

IGNORE_INDEX = -100  # label of positions that no loss is computed on (transformers' convention)


@dataclass(frozen=True)
class TokenizedDataset:
    """Unpadded token ids (truncated to ``max_length``) with labels.

    ``language_modeling``: the batch's labels are the token ids themselves, padding ignored
    (-100); the model shifts them for next-token prediction.
    Multiple choice (language modelling of prompt + right answer): ``answer_start[i]`` is
    where row i's answer begins (the loss ignores the prompt), ``choices[i]`` holds the token
    ids of every candidate answer (``labels[i]`` indexes the right one), scored after the
    prompt ``input_ids[i][:answer_start[i]]``; ``groups`` names each row's task.
    """

    input_ids: list[list[int]]
    labels: np.ndarray  # (N,) class labels, or the index of the right choice
    pad_id: int
    language_modeling: bool = False
    answer_start: list[int] | None = None
    choices: list[list[list[int]]] | None = None
    groups: np.ndarray | None = None
    group_names: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.input_ids)

    def subset(self, idx: np.ndarray | list[int]) -> TokenizedDataset:
        """The rows ``idx``, in that order."""
        idx = np.asarray(idx, dtype=np.int64)

        def pick(rows: list | None) -> list | None:
            return None if rows is None else [rows[i] for i in idx]

        return TokenizedDataset(
            pick(self.input_ids),
            self.labels[idx],
            self.pad_id,
            self.language_modeling,
            pick(self.answer_start),
            pick(self.choices),
            None if self.groups is None else self.groups[idx],
            self.group_names,
        )

    def inputs(self, idx: np.ndarray) -> dict[str, torch.Tensor]:
        """The rows ``idx`` padded to their longest: input_ids, attention_mask (B, T); what a
        pass that reads the routers but computes no loss feeds the model."""
        rows = [self.input_ids[i] for i in idx]
        width = max(len(r) for r in rows)
        ids_BT = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask_BT = torch.zeros((len(rows), width), dtype=torch.long)
        for b, r in enumerate(rows):
            ids_BT[b, : len(r)] = torch.tensor(r)
            mask_BT[b, : len(r)] = 1
        return {"input_ids": ids_BT, "attention_mask": mask_BT}

    def batch(self, idx: np.ndarray) -> dict[str, torch.Tensor]:
        """``inputs(idx)`` and the labels: (B, T) next tokens for language modeling, else (B,)."""
        batch = self.inputs(idx)
        ids_BT, mask_BT = batch["input_ids"], batch["attention_mask"]
        if self.language_modeling:
            labels = ids_BT.masked_fill(mask_BT == 0, IGNORE_INDEX)
            if self.answer_start is not None:  # no loss on the prompt
                for b, i in enumerate(idx):
                    labels[b, : self.answer_start[i]] = IGNORE_INDEX
        else:
            labels = torch.as_tensor(self.labels[idx], dtype=torch.long)
        return batch | {"labels": labels}


def tokenize(
    data: TextDataset,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    language_modeling: bool = False,
    with_groups: bool = False,
) -> TokenizedDataset:
    """Each text (with its pair, where the data set has pairs) as token ids, truncated to
    ``max_length``; ``with_groups``: keep the rows' groups (per-group test metrics)."""
    if data.pairs is None:
        ids = encode_heads(tokenizer, list(data.texts), max_length)
    else:
        enc = tokenizer(data.texts, data.pairs, truncation=True, max_length=max_length)
        ids = list(enc["input_ids"])
    return TokenizedDataset(
        ids,
        data.labels,
        _pad_id(tokenizer),
        language_modeling,
        groups=data.groups if with_groups else None,
        group_names=data.group_names if with_groups else (),
    )


#: a text longer than this many characters per kept token is tokenised from its head first
HEAD_CHARS_PER_TOKEN = 8
_LAST_WORD = re.compile(r"\s+\S*\Z")


def encode_heads(
    tokenizer: PreTrainedTokenizerBase, texts: list[str], max_length: int
) -> list[list[int]]:
    """``tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]``, the same ids,
    without reading the whole of long texts.

    Hand-written because a fast tokenizer splits and encodes a text whole before it truncates
    (a BBC article is about 30 times the 64 tokens the default job keeps: 0.55 s for each
    client's first round). A text longer than ``HEAD_CHARS_PER_TOKEN * max_length`` characters
    is cut there and tokenised; its ids stand where they filled ``max_length`` and every token
    kept ends before the cut's last run of whitespace: a tokenizer splits text into words at
    whitespace before it encodes them, so nothing after that run (the word the cut went
    through) reaches those tokens. Any other row is tokenised whole.
    """
    limit = HEAD_CHARS_PER_TOKEN * max_length
    ids = [None] * len(texts)
    from_head = tokenizer.is_fast and tokenizer.truncation_side == "right"  # keeps the head
    heads = [i for i, t in enumerate(texts) if len(t) > limit] if from_head else []
    if heads:
        cut = [texts[i][:limit] for i in heads]
        enc = tokenizer(cut, truncation=True, max_length=max_length, return_offsets_mapping=True)
        for j, i in enumerate(heads):
            row, offsets = enc["input_ids"][j], enc["offset_mapping"][j]
            last = _LAST_WORD.search(cut[j])  # the last run of whitespace and what follows
            boundary = last.start() if last else 0
            if len(row) == max_length and max(end for _, end in offsets) <= boundary:
                ids[i] = list(row)
    rest = [i for i, row in enumerate(ids) if row is None]
    if rest:
        enc = tokenizer([texts[i] for i in rest], truncation=True, max_length=max_length)
        for i, row in zip(rest, enc["input_ids"], strict=True):
            ids[i] = list(row)
    return ids  # type: ignore[return-value]


def _pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return int(pad or 0)


def tokenize_chat(
    data: TextDataset, tokenizer: PreTrainedTokenizerBase, max_length: int
) -> TokenizedDataset:
    """Instruction tuning: each conversation through the tokenizer's chat template; the loss is
    on the last message (the assistant's answer) only.

    The prompt is the template of every message before the answer with the generation prompt
    (what a served model sees); the answer's tokens are the rest of the whole conversation's
    template (its end-of-turn tokens included, so the model learns to stop). A conversation too
    long for ``max_length`` loses prompt tokens from its start, keeping at least half of
    ``max_length`` for the answer, whose end is cut last.
    """
    if data.conversations is None:
        raise ValueError("tokenize_chat needs a data set of conversations")
    if not getattr(tokenizer, "chat_template", None):
        raise HFedMoEError(
            "data.task: 'instruction' needs a tokenizer with a chat template "
            f"({type(tokenizer).__name__} has none)"
        )
    input_ids, starts = [], []
    for chat in data.conversations:
        prompt = _ids(tokenizer.apply_chat_template(chat[:-1], add_generation_prompt=True))
        whole = _ids(tokenizer.apply_chat_template(chat))
        if whole[: len(prompt)] != prompt:  # a template that renders turns differently
            raise HFedMoEError(
                "data.task: the tokenizer's chat template does not render a conversation as "
                "its prompt followed by the answer"
            )
        answer = whole[len(prompt) :]
        keep_prompt = max(max_length - len(answer), max_length // 2)
        prompt = prompt[max(len(prompt) - keep_prompt, 0) :]
        input_ids.append((prompt + answer)[:max_length])
        starts.append(len(prompt))
    return TokenizedDataset(
        input_ids,
        data.labels,
        _pad_id(tokenizer),
        language_modeling=True,
        answer_start=starts,
        groups=data.groups,
        group_names=data.group_names,
    )


def _ids(encoded: object) -> list[int]:
    """Token ids from ``apply_chat_template(tokenize=True)``: a list, or a BatchEncoding (newer
    transformers)."""
    ids = encoded["input_ids"] if isinstance(encoded, Mapping) else encoded
    return list(ids)


def tokenize_choices(
    data: TextDataset, tokenizer: PreTrainedTokenizerBase, max_length: int
) -> TokenizedDataset:
    """Multiple choice: each row is its prompt followed by its right answer.

    Prompt and answers are tokenised apart (every answer is scored after the same prompt
    tokens). A prompt too long for ``max_length`` with its longest answer loses tokens from its
    start (after any leading special tokens, e.g. BOS): the question sits at the prompt's end.
    """
    if data.choices is None:
        raise ValueError("tokenize_choices needs a multiple-choice data set")
    special = set(tokenizer.all_special_ids)
    prompts = tokenizer(data.texts)["input_ids"]
    input_ids, starts, choices = [], [], []
    for prompt, answers, label in zip(prompts, data.choices, data.labels, strict=True):
        answer_ids = [tokenizer(a, add_special_tokens=False)["input_ids"] for a in answers]
        lead = next((n for n, t in enumerate(prompt) if t not in special), len(prompt))
        room = max_length - max(len(a) for a in answer_ids)
        if room <= lead:
            raise ValueError(f"model.max_length ({max_length}) leaves no room for the prompt")
        if len(prompt) > room:
            prompt = prompt[:lead] + prompt[len(prompt) - (room - lead) :]
        input_ids.append(prompt + answer_ids[label])
        starts.append(len(prompt))
        choices.append(answer_ids)
    return TokenizedDataset(
        input_ids,
        data.labels,
        _pad_id(tokenizer),
        language_modeling=True,
        answer_start=starts,
        choices=choices,
        groups=data.groups,
        group_names=data.group_names,
    )


def tokenize_for(
    cfg: ExperimentConfig, data: TextDataset, tokenizer: PreTrainedTokenizerBase
) -> TokenizedDataset:
    """``data`` tokenised as the experiment's task needs it."""
    if cfg.data.task == "multiple-choice":
        return tokenize_choices(data, tokenizer, cfg.model.max_length)
    if cfg.data.task == "instruction":
        return tokenize_chat(data, tokenizer, cfg.model.max_length)
    lm = cfg.data.task == "language-modeling"
    # a local data set's groups are the user's (a shipped one's, movies, are too many to list)
    grouped = cfg.data.dataset == "local"
    return tokenize(
        data, tokenizer, cfg.model.max_length, language_modeling=lm, with_groups=grouped
    )


def padded_tokens(data: TokenizedDataset, batch_size: int) -> int:
    """Tokens a forward pass over ``data`` in :func:`sequential_batches` runs, padding
    included (what its FLOPs are counted on)."""
    return sum(
        len(idx) * max(len(data.input_ids[i]) for i in idx)
        for idx in sequential_batches(len(data), batch_size)
    )


def sequential_batches(n: int, batch_size: int) -> Iterator[np.ndarray]:
    """Index batches 0..n-1 in order (evaluation)."""
    for start in range(0, n, batch_size):
        yield np.arange(start, min(start + batch_size, n))


def shuffled_batches(
    n: int, batch_size: int, steps: int, rng: np.random.Generator
) -> Iterator[np.ndarray]:
    """``steps`` index batches, cycling through fresh permutations (training)."""
    order = rng.permutation(n)
    pos = 0
    for _ in range(steps):
        if pos + batch_size > n and pos > 0:
            order, pos = rng.permutation(n), 0
        batch = order[pos : pos + batch_size]
        pos += batch_size
        yield batch
