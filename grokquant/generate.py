"""Text generation from any artifact: an original checkpoint directory or a GGUF file.

Engines: `torch` (our model; GGUF weights are dequantized at load) and `llama.cpp` (GGUF only,
through llama-cpp-python).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from .errors import GrokquantError
from .tokenizer import format_chat


def _stream_text(tok, tokens: Iterator[int]) -> Iterator[str]:
    """Decode token by token, holding back bytes that do not yet form whole characters."""
    pending = b""
    for token in tokens:
        pending += tok.decode_bytes([token])
        try:
            text = pending.decode("utf-8")
        except UnicodeDecodeError:
            continue
        pending = b""
        yield text
    if pending:
        yield pending.decode("utf-8", errors="replace")


def generate(path: str | Path, prompt: str, max_new_tokens: int = 32, chat: bool = False, engine: str = "torch",
             semantics: str | None = None) -> Iterator[str]:
    """Yield the generated text piece by piece (greedy decoding)."""
    path = Path(path)
    text = format_chat([{"role": "user", "content": prompt}]) if chat else prompt
    if path.suffix == ".gguf":
        if engine == "llama.cpp":
            yield from _llamacpp(path, text, max_new_tokens)
            return
        from .export.vocab import tokenizer_from_gguf
        from .gguf_weights import GGUFWeights

        source = GGUFWeights(path)
        tok = tokenizer_from_gguf(source.metadata)
        semantics = semantics or source.semantics
    else:
        if engine != "torch":
            raise GrokquantError("the llama.cpp engine runs GGUF files; convert the checkpoint first")
        from .checkpoint import Checkpoint
        from .tokenizer import load_tokenizer

        source = Checkpoint.open(path)
        tok = load_tokenizer(source.tokenizer_path)
        semantics = semantics or "sglang"
    from .model import Grok2ForCausalLM

    model = Grok2ForCausalLM.from_checkpoint(source, semantics)
    stops = tuple(i for i in (tok.eos_id, tok.separator_id) if i is not None)
    yield from _stream_text(tok, model.generate_iter(tok.encode(text), max_new_tokens, stops))


def _llamacpp(path: Path, text: str, max_new_tokens: int) -> Iterator[str]:
    try:
        import llama_cpp
    except ImportError:
        raise GrokquantError("the llama.cpp engine needs llama-cpp-python (pip install 'grokquant[llama]')") from None
    llm = llama_cpp.Llama(str(path), n_ctx=512, verbose=False, yarn_beta_fast=-1.0, yarn_beta_slow=-1.0,
                          yarn_attn_factor=-1.0)
    for piece in llm(text, max_tokens=max_new_tokens, temperature=0.0, stream=True):
        yield piece["choices"][0]["text"]
