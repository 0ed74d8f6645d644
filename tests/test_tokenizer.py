"""ByteTokenizer: round trips, special tokens, HF-style call/decode API, persistence."""
import json

import pytest

from perk_fast.tokenizer import ByteTokenizer


@pytest.fixture
def tok():
    return ByteTokenizer()


@pytest.mark.parametrize(
    "text",
    ["", "plain ascii", "café — naïve ☃ 日本語 🙂", "tabs\tand\nnewlines\r\n", "\x00\x7f"],
    ids=["empty", "ascii", "unicode", "whitespace", "control"],
)
def test_round_trip_and_byte_count(tok, text):
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))  # one id per UTF-8 byte, no specials added
    assert all(0 <= i < 256 for i in ids)
    assert tok.decode(ids) == text


def test_special_tokens_are_single_ids_and_restored(tok):
    text = "Answer:<support>Mary went to the hallway.</support>\n<output>hallway</output><|endoftext|>"
    ids = tok.encode(text)
    for marker in ("<support>", "</support>", "<output>", "</output>"):
        assert ids.count(tok.convert_tokens_to_ids(marker)) == 1
    assert ids[-1] == tok.eos_token_id
    assert len(ids) == len(text.encode("utf-8")) - sum(
        len(m) - 1 for m in ("<support>", "</support>", "<output>", "</output>", "<|endoftext|>"))
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=True) == text.replace("<|endoftext|>", "")


def test_ids_and_sizes(tok):
    assert (tok.eos_token_id, tok.pad_token_id, tok.bos_token_id) == (256, 257, None)
    assert tok.vocab_size == len(tok) == 262
    assert sorted(tok.all_special_ids) == list(range(256, 262))
    assert len(ByteTokenizer(markers=())) == 258


def test_decode_invalid_utf8_and_unicode_next_to_specials(tok):
    assert tok.decode([0xE2, 0x82]) == "\ufffd"  # truncated 3-byte sequence
    ids = tok.encode("é<output>ü</output>")
    assert tok.decode(ids) == "é<output>ü</output>"
    with pytest.raises(ValueError, match="token id 262"):
        tok.decode([65, 262])


def test_call_batch_padding_and_tensors(tok):
    torch = pytest.importorskip("torch")
    one = tok("hi")
    assert one["input_ids"] == [104, 105] and one.attention_mask == [1, 1]
    batch = tok(["abc", "d"], padding=True, return_tensors="pt")
    assert batch["input_ids"].tolist() == [[97, 98, 99], [100, 257, 257]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["input_ids"].dtype == torch.long
    assert tok("abcdef", truncation=True, max_length=4)["input_ids"] == [97, 98, 99, 100]
    assert tok("ab", return_tensors="pt")["input_ids"].shape == (1, 2)
    with pytest.raises(ValueError, match="padding"):
        tok(["abc", "d"], return_tensors="pt")
    assert tok.batch_decode(batch["input_ids"], skip_special_tokens=True) == ["abc", "d"]
    assert tok.batch_decode(batch["input_ids"]) == ["abc", "d<|pad|><|pad|>"]


def test_save_and_load(tok, tmp_path):
    custom = ByteTokenizer(eos_token="</s>", markers=("<a>",), model_max_length=77)
    (path,) = custom.save_pretrained(tmp_path / "tok")
    assert json.loads(open(path).read())["markers"] == ["<a>"]
    loaded = ByteTokenizer.from_pretrained(tmp_path / "tok")
    assert loaded.name_or_path == str(tmp_path / "tok")
    assert loaded.all_special_tokens == ["</s>", "<|pad|>", "<a>"]
    assert loaded.model_max_length == 77
    assert loaded.encode("x<a></s>") == [120, 258, 256]


@pytest.mark.parametrize("kwargs, field", [
    ({"markers": ("",)}, "special token"),
    ({"pad_token": "<|endoftext|>"}, "distinct"),
    ({"model_max_length": 0}, "model_max_length"),
])
def test_invalid_construction(kwargs, field):
    with pytest.raises(ValueError, match=field):
        ByteTokenizer(**kwargs)
