"""Dataset to tokens: packing masks documents off from each other; chat data trains on responses."""

from __future__ import annotations

import json

import pytest
import torch

from runner import data as D
from runner.demo import build_tiny_model
from sweeper.errors import UserError
from sweeper.spec import DataSpec


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = build_tiny_model(tmp_path_factory.mktemp("m"), ["the cat sat on the mat", "a dog ran far away"] * 50)
    return AutoModelForCausalLM.from_pretrained(folder, attn_implementation="sdpa").eval(), AutoTokenizer.from_pretrained(folder)


def test_packed_documents_do_not_attend_to_each_other(tiny):
    model, _ = tiny
    docs = [D.Doc(list(range(5, 15)), list(range(5, 15))), D.Doc(list(range(20, 27)), list(range(20, 27)))]
    rows = D.pack(docs, seq_len=24, pad_id=0)
    ids, pos = torch.tensor(rows.input_ids), torch.tensor(rows.position_ids)
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=pos, use_cache=False).logits[0]
        alone = [model(input_ids=torch.tensor([d.input_ids]), use_cache=False).logits[0] for d in docs]
    torch.testing.assert_close(packed[:10], alone[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(packed[10:17], alone[1], atol=1e-5, rtol=1e-4)


def test_pack_fills_rows_restarts_positions_and_masks_document_starts():
    docs = [D.Doc([1, 2, 3], [1, 2, 3]), D.Doc([4, 5, 6, 7, 8], [4, 5, 6, 7, 8]), D.Doc([9], [9])]
    rows = D.pack(docs, seq_len=4, pad_id=0)
    assert rows.input_ids == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 0, 0, 0]]
    assert rows.position_ids == [[0, 1, 2, 0], [0, 1, 2, 3], [0, 0, 1, 2]]
    # A document's first token is never a target, nor is the piece continuing on the next row, nor padding.
    assert rows.labels == [[-100, 2, 3, -100], [-100, 6, 7, 8], [-100, -100, -100, -100]]
    assert rows.real == [4, 4, 1]


def test_pad_each_keeps_one_document_per_row():
    rows = D.pad_each([D.Doc([1, 2], [1, 2]), D.Doc([3, 4, 5, 6, 7], [3, 4, 5, 6, 7])], seq_len=4, pad_id=0)
    assert rows.input_ids == [[1, 2, 0, 0], [3, 4, 5, 6]]
    assert rows.labels == [[1, 2, -100, -100], [3, 4, 5, 6]]
    assert rows.real == [2, 4]


def test_chat_records_take_loss_on_the_response_only(tiny):
    _, tokenizer = tiny
    spec = DataSpec(source="x.jsonl", prompt_field="q", response_field="a")
    (doc,) = D.tokenize([{"q": "the cat", "a": "sat on the mat"}], tokenizer, spec, max_len=64)
    response = tokenizer("sat on the mat", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert doc.labels[-len(response):] == response
    assert set(doc.labels[: -len(response)]) == {D.IGNORE}
    assert tokenizer.decode(doc.input_ids).startswith("### Instruction:\nthe cat")


def test_text_records_end_in_eos_and_fit_the_sequence(tiny):
    _, tokenizer = tiny
    docs = D.tokenize([{"text": "the cat sat on the mat " * 20}], tokenizer, DataSpec(source="x.jsonl"), max_len=16)
    assert len(docs[0].input_ids) == 16 and docs[0].input_ids[-1] == tokenizer.eos_token_id


def test_eval_split_is_fixed_and_disjoint():
    docs = [D.Doc([i], [i]) for i in range(100)]
    train, held = D.split_eval(docs, 10, seed=0)
    assert D.split_eval(docs, 10, seed=0)[1] == held
    assert len(held) == 10 and not {d.input_ids[0] for d in held} & {d.input_ids[0] for d in train}


def test_budget_in_tokens_or_examples_repeats_the_data_in_reshuffled_epochs():
    docs = [D.Doc([i] * 10, [i] * 10) for i in range(5)]
    by_tokens = D.budget_docs(docs, 16, seed=0, tokens=120, examples=None)
    assert sum(len(d.input_ids) for d in by_tokens) == 120
    assert len(D.budget_docs(docs, 16, seed=0, tokens=None, examples=7)) == 7
    assert by_tokens[:5] != by_tokens[5:10] and sorted(d.input_ids[0] for d in by_tokens[5:10]) == list(range(5))


@pytest.mark.parametrize("content, message", [
    ('{"text": "ok"}\n{not json}\n', "data.jsonl:2: not valid JSON"),
    ('["a list"]\n', "data.jsonl:1: expected a JSON object"),
])
def test_malformed_jsonl_names_the_line(tmp_path, content, message):
    path = tmp_path / "data.jsonl"
    path.write_text(content)
    with pytest.raises(UserError, match=message):
        D.load_records(DataSpec(source=str(path)))


def test_record_without_the_text_field_is_a_user_error(tiny):
    _, tokenizer = tiny
    with pytest.raises(UserError, match="record 0 has no text field 'text'"):
        D.tokenize([{"body": "x"}], tokenizer, DataSpec(source="x.jsonl"), max_len=16)


def test_too_few_examples_for_the_eval_split_is_a_user_error():
    with pytest.raises(UserError, match="not more than data.eval_examples=5"):
        D.split_eval([D.Doc([1], [1])] * 5, 5, seed=0)


def test_a_hugging_face_dataset_folder_loads_through_datasets(tmp_path):
    folder = tmp_path / "ds"
    folder.mkdir()
    (folder / "train.json").write_text("\n".join(json.dumps({"text": f"row {i}"}) for i in range(3)))
    records = D.load_records(DataSpec(source=str(folder), split="train"))
    assert [r["text"] for r in records] == ["row 0", "row 1", "row 2"]
    with pytest.raises(UserError, match="cannot load dataset .* split 'validation'"):
        D.load_records(DataSpec(source=str(folder), split="validation"))


def test_a_local_jsonl_file_of_any_name_is_read_as_jsonl(tmp_path):
    path = tmp_path / "train.json"
    path.write_text('{"text": "a"}\n{"text": "b"}\n')
    assert [r["text"] for r in D.load_records(DataSpec(source=str(path)))] == ["a", "b"]
