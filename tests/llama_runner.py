"""Runs llama.cpp (through llama-cpp-python) in a child process, so a bad file cannot abort pytest.

    python llama_runner.py logits GGUF TOKENS_JSON OUT_NPY
    python llama_runner.py tokenize GGUF TEXTS_JSON OUT_JSON
    python llama_runner.py chat GGUF MESSAGES_JSON OUT_JSON
    python llama_runner.py quantize IN_GGUF OUT_GGUF FTYPE_ID PURE(0/1) [IMATRIX_NPZ]
"""

import ctypes
import json
import sys

import numpy as np


def load(path, **kw):
    from grokquant.runtime.llama_engine import EXACT, open_llama

    return open_llama(path, n_ctx=256, logits_all=True, verbose=False, n_threads=2, **EXACT, **kw)


def main(cmd, *args):
    import llama_cpp

    if cmd == "logits":
        path, tokens, out = args
        llm = load(path)
        toks = json.loads(open(tokens).read())
        llm.eval(toks)
        np.save(out, np.array(llm.scores[: len(toks)], dtype=np.float32))
    elif cmd == "tokenize":
        path, texts, out = args
        llm = load(path, vocab_only=True)
        res = [llm.tokenize(t.encode(), add_bos=False, special=True) for t in json.loads(open(texts).read())]
        open(out, "w").write(json.dumps(res))
    elif cmd == "chat":
        path, messages, out = args
        llm = load(path, vocab_only=True)
        tmpl = llama_cpp.llama_model_chat_template(llm.model, None)
        msgs = json.loads(open(messages).read())
        arr = (llama_cpp.llama_chat_message * len(msgs))(
            *[llama_cpp.llama_chat_message(m["role"].encode(), m["content"].encode()) for m in msgs])
        buf = ctypes.create_string_buffer(1 << 16)
        n = llama_cpp.llama_chat_apply_template(tmpl, arr, len(msgs), True, buf, len(buf))
        open(out, "w").write(json.dumps({"n": n, "text": buf.raw[:max(n, 0)].decode()}))
    elif cmd == "quantize":
        src, dst, ftype, pure = args[:4]
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = int(ftype)
        params.pure = bool(int(pure))
        params.nthread = 2
        keep = []
        if len(args) > 4:  # importance per tensor: name -> [n_mat, n] float32, averaged already
            data = np.load(args[4])
            entries = (llama_cpp.llama_model_imatrix_data * (len(data.files) + 1))()
            for i, name in enumerate(data.files):
                arr = np.ascontiguousarray(data[name], dtype=np.float32).reshape(-1)
                keep.append(arr)
                entries[i].name = name.encode()
                entries[i].data = arr.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
                entries[i].size = arr.size
            params.imatrix = entries
        rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params))
        sys.exit(rc)
    else:
        sys.exit(f"unknown command {cmd}")


if __name__ == "__main__":
    main(*sys.argv[1:])
