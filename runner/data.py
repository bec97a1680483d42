"""Dataset to tokens: records -> documents -> fixed held-out split -> packed training sequences, once per sweep.

Packing puts several documents in one sequence with their position ids restarting at 0; with
`use_cache=False`, transformers turns those position ids into a block-diagonal causal mask for
SDPA and eager attention, so no document attends to another (tests/test_data.py proves it).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runner.hub import cannot_load, check_model_source
from sweeper.errors import UserError, first_line
from sweeper.spec import DataSpec, SweepSpec

IGNORE = -100  # label value the loss skips


@dataclass
class Doc:
    input_ids: list[int]
    labels: list[int]  # IGNORE where no loss is taken (the prompt of a chat example)


@dataclass
class Batchable:
    """Sequences ready to batch: equal-length rows of input ids, labels and position ids."""

    input_ids: list[list[int]]
    labels: list[list[int]]
    position_ids: list[list[int]]
    real: list[int]
    """Tokens per row that are not padding (padding always ends a row)."""

    def __len__(self) -> int:
        return len(self.input_ids)


# ---------------------------------------------------------------------------------------------
# Records


def load_records(data: DataSpec) -> list[dict[str, Any]]:
    """The raw examples: a local JSONL file (any name), or a Hugging Face dataset (hub name or local folder) split."""
    path = Path(data.source).expanduser()
    if path.suffix == ".jsonl" or path.is_file():
        return _read_jsonl(path)
    import datasets

    name, _, config = (str(path), "", "") if path.is_dir() else data.source.partition(":")
    try:
        return list(datasets.load_dataset(name, config or None, split=data.split))
    except Exception as e:  # hub, network and format errors all end the same way for the user
        raise UserError(f"cannot load dataset {data.source!r} split {data.split!r}: {first_line(e)}") from None


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise UserError(f"cannot read dataset {path}: {e.strerror or e}") from None
    records = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{i}: not valid JSON ({e.msg})") from None
        if not isinstance(record, dict):
            raise UserError(f"{path}:{i}: expected a JSON object")
        records.append(record)
    return records


# ---------------------------------------------------------------------------------------------
# Tokens


def tokenize(records: list[dict[str, Any]], tokenizer, data: DataSpec, max_len: int) -> list[Doc]:
    """Each record to a Doc ending in EOS. Chat records take loss on the response only."""
    chat = data.prompt_field is not None
    fields = [data.prompt_field, data.response_field] if chat else [data.text_field]
    for i, record in enumerate(records[:1000]):
        missing = [f for f in fields if not isinstance(record.get(f), str)]
        if missing:
            raise UserError(f"dataset record {i} has no text field {missing[0]!r} (fields: {', '.join(record)})")
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if not chat:
        encoded = tokenizer([r[data.text_field] for r in records], add_special_tokens=True)["input_ids"]
        docs = [ids[: max_len - len(eos)] + eos for ids in encoded if ids]
        return [Doc(ids, list(ids)) for ids in docs]
    prompts = [_prompt_text(tokenizer, r[data.prompt_field]) for r in records]
    p_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    r_ids = tokenizer([r[data.response_field] for r in records], add_special_tokens=False)["input_ids"]
    docs = []
    for p, r in zip(p_ids, r_ids):
        ids = (p + r + eos)[:max_len]
        labels = ([IGNORE] * len(p) + r + eos)[:max_len]
        if any(t != IGNORE for t in labels):
            docs.append(Doc(ids, labels))
    return docs


def _prompt_text(tokenizer, prompt: str) -> str:
    """The model's chat template where it has one, else a plain instruction format."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    return f"### Instruction:\n{prompt}\n\n### Response:\n"


def split_eval(docs: list[Doc], n_eval: int, seed: int) -> tuple[list[Doc], list[Doc]]:
    """A fixed held-out set: the same documents for every trial of a sweep."""
    if len(docs) <= n_eval:
        raise UserError(f"dataset has {len(docs)} usable examples, not more than data.eval_examples={n_eval}")
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    eval_ids = set(order[:n_eval])
    return [d for i, d in enumerate(docs) if i not in eval_ids], [docs[i] for i in sorted(eval_ids)]


def budget_docs(train: list[Doc], seq_len: int, seed: int, tokens: int | None, examples: int | None) -> list[Doc]:
    """The training documents for a budget, reshuffled each epoch: the same stream for every trial."""
    out: list[Doc] = []
    epoch, used_tokens = 0, 0
    while True:
        order = list(range(len(train)))
        random.Random(seed * 1000 + epoch).shuffle(order)
        for i in order:
            if (examples is not None and len(out) >= examples) or (tokens is not None and used_tokens >= tokens):
                return out
            out.append(train[i])
            used_tokens += len(train[i].input_ids)
        epoch += 1


# ---------------------------------------------------------------------------------------------
# Sequences


def pack(docs: list[Doc], seq_len: int, pad_id: int) -> Batchable:
    """Concatenate documents into rows of seq_len; position ids restart at each document.

    The first token of each document gets no label: it must not be predicted from the previous one.
    A document longer than a row continues on the next row as a new document.
    """
    rows = Batchable([], [], [], [])
    ids: list[int] = []
    labels: list[int] = []
    pos: list[int] = []

    def flush() -> None:
        pad = seq_len - len(ids)
        # Padding is one more "document" of ignored tokens, so real tokens never attend to it.
        rows.input_ids.append(ids + [pad_id] * pad)
        rows.labels.append(labels + [IGNORE] * pad)
        rows.position_ids.append(pos + list(range(pad)))
        rows.real.append(len(ids))
        ids.clear(), labels.clear(), pos.clear()

    for doc in docs:
        start = 0
        while start < len(doc.input_ids):
            room = seq_len - len(ids)
            chunk = slice(start, start + room)
            piece_ids, piece_labels = doc.input_ids[chunk], list(doc.labels[chunk])
            piece_labels[0] = IGNORE
            ids.extend(piece_ids), labels.extend(piece_labels), pos.extend(range(len(piece_ids)))
            start += len(piece_ids)
            if len(ids) == seq_len:
                flush()
    if ids:
        flush()
    return rows


def pad_each(docs: list[Doc], seq_len: int, pad_id: int) -> Batchable:
    """One document per row, padded to seq_len: the no-packing layout (and the baseline's)."""
    rows = Batchable([], [], [], [])
    for doc in docs:
        ids, labels = doc.input_ids[:seq_len], doc.labels[:seq_len]
        pad = seq_len - len(ids)
        rows.input_ids.append(ids + [pad_id] * pad)
        rows.labels.append(labels + [IGNORE] * pad)
        rows.position_ids.append(list(range(len(ids))) + list(range(pad)))
        rows.real.append(len(ids))
    return rows


@dataclass
class SweepData:
    """What every trial of a sweep shares: the tokenizer and the same train and eval sequences."""

    tokenizer: Any
    train: Batchable
    eval: Batchable


def documents(spec: SweepSpec) -> tuple[Any, list[Doc], list[Doc]]:
    """(tokenizer, train documents, held-out documents): the dataset tokenized and split, as every trial sees it."""
    from transformers import AutoTokenizer

    check_model_source(spec.model.id)  # the worker's first look at the model: one clear line if it is not there
    try:
        tokenizer = AutoTokenizer.from_pretrained(spec.model.id)
    except (OSError, ValueError) as e:
        raise cannot_load("tokenizer", spec.model.id, e) from None
    docs = tokenize(load_records(spec.data), tokenizer, spec.data, spec.model.max_seq_len)
    return (tokenizer, *split_eval(docs, spec.data.eval_examples, spec.train.seed))


def prepare_data(spec: SweepSpec, docs: tuple[Any, list[Doc], list[Doc]] | None = None) -> SweepData:
    """Tokenize the dataset once per sweep: every trial trains on the same sequences. docs: documents(spec) where
    the caller has them already (the full run counts its epochs in them)."""
    tokenizer, train_docs, eval_docs = docs or documents(spec)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    seq_len, seed = spec.model.max_seq_len, spec.train.seed
    budget = budget_docs(train_docs, seq_len, seed, spec.budget.train_tokens, spec.budget.train_examples)
    layout = pack if spec.data.packing else pad_each
    return SweepData(tokenizer, layout(budget, seq_len, pad_id), layout(eval_docs, seq_len, pad_id))
