"""Data loading and formatting: response-only labels, field maps, bad rows, truncation."""

import pytest

from safecl.data.config import DataConfig
from safecl.data.formatting import IGNORE, collate, encode_example
from safecl.data.records import Example
from safecl.data.sources import load_examples
from safecl.errors import DataError
from tests.conftest import write_jsonl


def test_labels_cover_exactly_the_response(tiny):
    _, tok = tiny
    ex = Example(messages=[{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi there!"}])
    enc = encode_example(tok, ex, max_len=512)
    labeled = [t for t, l in zip(enc.input_ids, enc.labels) if l != IGNORE]
    assert tok.decode(labeled) == "Hi there!<|im_end|>\n"
    first = enc.labels.index(next(l for l in enc.labels if l != IGNORE))
    assert tok.decode(enc.input_ids[:first]).endswith("<|im_start|>assistant\n")
    assert all(l == IGNORE for l in enc.labels[:first])
    assert enc.labels[first:] == enc.input_ids[first:]


def test_instruction_input_and_system_prompt(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "Add.", "input": "2 and 3", "output": "5"}])
    (ex,), _ = load_examples(DataConfig(source=str(path), system_prompt="Be brief."))
    assert ex.messages == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Add.\n\n2 and 3"},
                           {"role": "assistant", "content": "5"}]


def test_chat_rows_and_field_mapping(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [
        {"conv": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
    ])
    (ex,), _ = load_examples(DataConfig(source=str(path), fields={"messages": "conv"}))
    assert ex.response == "a" and ex.prompt_messages == [{"role": "user", "content": "q"}]
    path2 = write_jsonl(tmp_path / "q.jsonl", [{"question": "2+2?", "solution": "4"}])
    (ex2,), _ = load_examples(DataConfig(source=str(path2), fields={"instruction": "question", "output": "solution"}))
    assert ex2.messages[-1]["content"] == "4"


def test_csv_and_json_sources(tmp_path):
    (tmp_path / "d.csv").write_text("instruction,input,output\nhello,,world\n")
    (tmp_path / "d.json").write_text('[{"instruction": "a", "output": "b"}]')
    assert load_examples(DataConfig(source=str(tmp_path / "d.csv")))[0][0].response == "world"
    assert load_examples(DataConfig(source=str(tmp_path / "d.json")))[0][0].response == "b"


def test_bad_row_names_file_and_row(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "a", "output": "b"}, {"instruction": "c"}])
    with pytest.raises(DataError, match=r"bad.jsonl: row 2: field 'output' is missing"):
        load_examples(DataConfig(source=str(path)))
    examples, report = load_examples(DataConfig(source=str(path), on_bad_record="skip"))
    assert len(examples) == 1 and report.skipped == 1 and report.rows == 2


def test_invalid_json_line_and_empty_set(tmp_path):
    p = tmp_path / "broken.jsonl"
    p.write_text('{"instruction": "a", "output": "b"}\n{not json\n')
    with pytest.raises(DataError, match=r"broken.jsonl: row 2: not valid JSON"):
        load_examples(DataConfig(source=str(p)))
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(DataError, match="no usable rows"):
        load_examples(DataConfig(source=str(tmp_path / "empty.json")))


def test_duplicates_counted_limit_and_shuffle(tmp_path):
    rows = [{"instruction": f"q{i % 5}", "output": "a"} for i in range(10)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    examples, report = load_examples(DataConfig(source=str(path)))
    assert report.duplicates == 5
    a, _ = load_examples(DataConfig(source=str(path), shuffle=True, limit=4), seed=1)
    b, _ = load_examples(DataConfig(source=str(path), shuffle=True, limit=4), seed=1)
    assert [e.messages for e in a] == [e.messages for e in b] and len(a) == 4


def test_truncation_keeps_prefix_and_drops_responseless(tiny):
    _, tok = tiny
    ex = Example(messages=[{"role": "user", "content": "x" * 50}, {"role": "assistant", "content": "y" * 50}])
    enc = encode_example(tok, ex, max_len=80)
    assert len(enc.input_ids) == 80 and enc.labels[-1] != IGNORE
    assert encode_example(tok, ex, max_len=40) is None


def test_collate_pads_right_with_ignored_labels(tiny):
    _, tok = tiny
    a = encode_example(tok, Example(messages=[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]), 64)
    b = encode_example(tok, Example(messages=[{"role": "user", "content": "aaaa"}, {"role": "assistant", "content": "bbbb"}]), 64)
    batch = collate([a, b], tok.pad_token_id)
    n = len(a.input_ids)
    assert batch["input_ids"].shape[1] == len(b.input_ids)
    assert (batch["labels"][0, n:] == IGNORE).all() and (batch["attention_mask"][0, n:] == 0).all()
    assert (batch["input_ids"][0, n:] == tok.pad_token_id).all()


def test_where_keeps_only_matching_rows(tmp_path):
    from safecl.data.config import DataConfig
    from safecl.data.sources import load_examples
    from safecl.errors import DataError

    harmful, _ = load_examples(DataConfig(source="builtin:safety", where={"kind": "harmful"}), need_response=False)
    benign, _ = load_examples(DataConfig(source="builtin:safety", where={"kind": "benign"}), need_response=False)
    everything, _ = load_examples(DataConfig(source="builtin:safety"), need_response=False)
    assert len(harmful) + len(benign) == len(everything) and harmful and benign
    assert not {h.messages[0]["content"] for h in harmful} & {b.messages[0]["content"] for b in benign}
    with pytest.raises(DataError, match="no row matches"):
        load_examples(DataConfig(source="builtin:safety", where={"kind": "nope"}))
