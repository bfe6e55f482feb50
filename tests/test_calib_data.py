import json

import pytest
import torch

from grokquant.data.documents import calibration_tokens, load_documents
from grokquant.errors import GrokquantError
from grokquant.grok.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tok(tiny_tp8):
    return load_tokenizer(tiny_tp8 / "tokenizer.tok.json")


def test_builtin_windows_are_reproducible(tok):
    a = calibration_tokens(tok, "builtin", 1000, 100, seed=3)
    assert a.shape == (10, 100) and a.dtype == torch.long
    assert torch.equal(a, calibration_tokens(tok, "builtin", 1000, 100, seed=3))
    assert not torch.equal(a, calibration_tokens(tok, "builtin", 1000, 100, seed=4))
    assert int(a.max()) < tok.n_vocab


def test_file_folder_and_jsonl(tok, tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("alpha beta gamma " * 50)
    (tmp_path / "d" / "b.md").write_text("delta epsilon " * 50)
    (tmp_path / "d" / "skip.bin").write_bytes(b"\0\1")
    assert len(load_documents(tmp_path / "d")) == 2
    rows = [{"text": "plain text row"}, {"prompt": "What is 2+2?", "response": "4."}]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    docs = load_documents(tmp_path / "c.jsonl", chat=True)
    assert docs[1] == "Human: What is 2+2?<|separator|>\n\nAssistant: 4.<|separator|>\n\n"
    ids = calibration_tokens(tok, tmp_path / "c.jsonl", 20, 10, chat=True)
    assert tok.special["<|separator|>"] in ids.flatten().tolist() or ids.numel() == 20


@pytest.mark.parametrize("content,match", [('{"nope": 1}', "expected a `text` field"), ("{bad", "not valid JSON")])
def test_bad_jsonl(tmp_path, content, match):
    (tmp_path / "x.jsonl").write_text(content + "\n")
    with pytest.raises(GrokquantError, match=match):
        load_documents(tmp_path / "x.jsonl")


def test_too_little_data(tok, tmp_path):
    (tmp_path / "small.txt").write_text("tiny")
    with pytest.raises(GrokquantError, match="tokens"):
        calibration_tokens(tok, tmp_path / "small.txt", 1000, 100)
    with pytest.raises(GrokquantError, match="no such"):
        load_documents(tmp_path / "missing.txt")
