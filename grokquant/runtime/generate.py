"""Text generation from any artifact: an original checkpoint, a GPTQ directory or a GGUF file.

Engines: `torch` (our model through `grokquant.load`: quantized kernels, optional GPU placement)
and `llama.cpp` (GGUF only, through llama-cpp-python).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from grokquant.errors import GrokquantError
from grokquant.grok.tokenizer import format_chat


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
             semantics: str | None = None, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
             device: str = "cpu", gpu_memory: str | None = None, cpu_memory: str | None = None) -> Iterator[str]:
    """The generated text piece by piece (greedy at temperature 0, else sampled). Everything that can be
    refused (options, prompt, the artifact) is checked, and the model loaded, before this returns."""
    from grokquant.runtime.load import load, open_source

    _check_sampling(temperature, top_p)
    text = format_chat([{"role": "user", "content": prompt}]) if chat else prompt
    device_map, max_memory = device_placement(device, gpu_memory, cpu_memory)  # bad sizes refused first
    source = open_source(path)
    try:
        tok = source.tokenizer()
        ids = tok.encode(text)
        context = source.config.max_position_embeddings
        if not ids:
            raise GrokquantError("the prompt is empty: give some text (or --chat, which adds the chat template)")
        if not 0 <= max_new_tokens <= context - len(ids):
            raise GrokquantError(f"--max-new-tokens {max_new_tokens}: between 0 and {context - len(ids)} (the "
                                 f"model's context of {context} tokens less the prompt's {len(ids)})")
    except BaseException:
        source.close()
        raise
    if engine == "llama.cpp":
        source.close()  # llama.cpp reads the file itself
        if source.kind != "gguf":
            raise GrokquantError("the llama.cpp engine runs GGUF files; convert the checkpoint first")
        return _llamacpp(source.path, text, len(ids) + max_new_tokens, max_new_tokens, temperature, top_p, seed)
    model = load(source, device_map=device_map, max_memory=max_memory, semantics=semantics)
    stops = tuple(i for i in (tok.eos_id, tok.separator_id) if i is not None)
    return _stream_text(tok, sample_iter(model, ids, max_new_tokens, stops, temperature, top_p, seed))


def _check_sampling(temperature: float, top_p: float) -> None:
    if not temperature >= 0 or not 0 < top_p <= 1:  # `not >=`: NaN is refused too
        raise GrokquantError("temperature must be >= 0 and top-p in (0, 1]")


def device_placement(device: str, gpu_memory: str | None, cpu_memory: str | None) -> tuple[str, dict | None]:
    """(device_map, max_memory) for `run`'s --device / --gpu-memory / --cpu-memory."""
    import torch

    from grokquant.runtime.load import available_memory, resolve_device
    from grokquant.runtime.sizes import parse_memory

    gpu_bytes, cpu_bytes = (parse_memory(m) if m is not None else None for m in (gpu_memory, cpu_memory))
    device = resolve_device(device)
    if device == "cpu" or (gpu_memory is None and cpu_memory is None):
        return device, None
    gpus = [device] if ":" in device else [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    free = available_memory()
    memory = {g: free[g] if gpu_bytes is None else gpu_bytes for g in gpus}
    memory["cpu"] = free["cpu"] if cpu_bytes is None else cpu_bytes
    return "auto", memory


def sample_iter(model, prompt: list[int], max_new_tokens: int, stop_ids: tuple[int, ...] = (),
                temperature: float = 0.0, top_p: float = 1.0, seed: int = 0) -> Iterator[int]:
    """Tokens one at a time with a KV cache: greedy at temperature 0, else temperature / nucleus sampling.

    The one decoding loop of grokquant: `run`, the tests and the examples all decode through it."""
    import torch

    from grokquant.grok.model import KVCache

    _check_sampling(temperature, top_p)
    generator = torch.Generator().manual_seed(seed)
    device = model.model.embed_tokens.weight.device
    cache = KVCache(model.cfg.num_hidden_layers)
    with torch.no_grad():
        logits = model(torch.tensor([prompt], device=device), cache)
        for _ in range(max_new_tokens):
            token = pick_token(logits[0, -1].float().cpu(), temperature, top_p, generator)
            if token in stop_ids:
                return
            yield token
            logits = model(torch.tensor([[token]], device=device), cache)


def pick_token(logits, temperature: float, top_p: float, generator) -> int:
    import torch

    if temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        keep = sorted_probs.cumsum(0) - sorted_probs < top_p  # the smallest prefix reaching top_p
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


def _llamacpp(path: Path, text: str, n_ctx: int, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
              seed: int = 0) -> Iterator[str]:
    from grokquant.runtime.llama_engine import open_llama

    # a few tokens of room: llama.cpp tokenizes the prompt itself and may count one or two more (BOS)
    llm = open_llama(path, n_ctx=max(n_ctx + 8, 512), verbose=False, yarn_beta_fast=-1.0, yarn_beta_slow=-1.0,
                     yarn_attn_factor=-1.0, seed=seed)
    for piece in llm(text, max_tokens=max_new_tokens, temperature=temperature, top_p=top_p, stream=True):
        yield piece["choices"][0]["text"]
