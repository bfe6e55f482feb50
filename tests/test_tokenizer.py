import json

import pytest
import regex

from grokquant.data.corpus import builtin_text
from grokquant.errors import CheckpointError
from grokquant.grok.tokenizer import PAT_STR_B, format_chat, load_tokenizer, train_bpe

SAMPLES = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "Numbers split into digits: 3.14159 and 2026-11-28, 1,000,000.",
    "  leading spaces\n\n\ttabs and\r\nCRLF lines  ",
    "Ünïcödé: naïve café, Straße, 日本語のテキスト, русский текст, emoji 🚀🔥",
    "def f(x):\n    return {'a': [1, 2, 3]}  # code\n",
    "I'm sure they'll say it's fine; WE'VE DONE IT, you'RE right.",
]


@pytest.fixture(scope="module")
def tok(tiny_tp8):
    return load_tokenizer(tiny_tp8 / "tokenizer.tok.json")


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert all(0 <= i < tok.n_vocab for i in ids)


def test_round_trip_real_text(tok):
    text = builtin_text("heldout", 20000)
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert len(ids) < len(text.encode()) * 0.6  # merges learned from real text compress it


def test_digits_are_single_tokens(tok):
    pieces = [tok.decode([i]) for i in tok.encode("1234567890")]
    assert pieces == list("1234567890")


def test_pretokenizer_matches_pat_str_b(tok):
    text = SAMPLES[5] + SAMPLES[2]
    words = regex.findall(PAT_STR_B, text)
    assert sum(len(tok.encode(w)) for w in words) == len(tok.encode(text))


def test_specials_and_chat_format(tok):
    sep, eos = tok.special["<|separator|>"], tok.special["<|eos|>"]
    assert eos == tok.eos_id == 2
    chat = format_chat([{"role": "system", "content": " Be brief. "}, {"role": "user", "content": "Hi?"}])
    assert chat == "System: Be brief.<|separator|>\n\nHuman: Hi?<|separator|>\n\nAssistant:"
    ids = tok.encode(chat)
    assert ids.count(sep) == 2
    assert sep not in tok.encode(chat, allow_special=False)
    assert tok.decode(ids) == chat


def test_train_bpe_fills_vocab_exactly():
    tokjson = train_bpe("abc abd abe " * 50, 300, ["<|pad|>", "<|eos|>"], {"<|pad|>": 0, "<|eos|>": 299})
    ids = sorted([t["token"] for t in tokjson["regular_tokens"]] + [t["token"] for t in tokjson["special_tokens"]])
    assert ids == list(range(300))
    assert tokjson["regular_tokens"][0] == {"bytes": [0], "token": 1}


def test_bad_tokenizer_files(tmp_path):
    good = train_bpe("hello world " * 20, 260, ["<|eos|>"])
    cases = {
        "word_split": {**good, "word_split": "V0"},
        "single-byte": {**good, "regular_tokens": good["regular_tokens"][1:]},
        "malformed": {**good, "special_tokens": [{"bytes": "x"}]},
    }
    for label, data in cases.items():
        p = tmp_path / f"{label}.json"
        p.write_text(json.dumps(data))
        with pytest.raises(CheckpointError, match=p.name):
            load_tokenizer(p)
