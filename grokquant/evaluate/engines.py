"""The logits an artifact gives on the evaluation windows, from our model or from llama.cpp.

An artifact is anything `runtime.load.open_source` opens: an original checkpoint directory, a GPTQ
directory (from `grokquant quantize`) or a GGUF file. GGUF files run in our model (`torch` engine,
computing as llama.cpp's CPU backend does) or in llama.cpp itself (`llama.cpp` engine:
llama-cpp-python in a child process, `python -m grokquant.evaluate.engines`, so that a bad file
cannot abort ours).
"""

from __future__ import annotations

import importlib.util
import math
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from grokquant.errors import GrokquantError
from grokquant.evaluate.resume import PassWork
from grokquant.evaluate.windows import Windows
from grokquant.runtime.load import Source, open_source

ENGINES = ("torch", "llama.cpp")
WHOLE_MODEL_BYTES = 2 << 30  # float32 weights up to this size are loaded at once, larger ones streamed


@dataclass
class Artifact:
    """What to evaluate and how; the files are opened only while they are used."""
    path: Path
    kind: str  # checkpoint, gptq or gguf
    engine: str = "torch"  # torch or llama.cpp (GGUF only)
    semantics: str = "sglang"

    @property
    def label(self) -> str:
        return self.path.name + (" [llama.cpp]" if self.engine == "llama.cpp" else "")

    def open(self) -> Source:
        return open_source(self.path)

    def size_bytes(self) -> int:
        with self.open() as source:
            return source.size_bytes()

    def tokenizer(self):
        with self.open() as source:
            return source.tokenizer()


def open_artifact(path: str | Path, engine: str = "torch", semantics: str | None = None) -> Artifact:
    """Recognise what `path` is; `semantics` overrides the torch engine's default (sglang for
    checkpoints and GPTQ, the file's own llama.cpp semantics for GGUF)."""
    if engine not in ENGINES:
        raise GrokquantError(f"unknown engine {engine!r} (torch or llama.cpp)")
    with open_source(path) as source:
        kind, own_semantics = source.kind, source.semantics
    if engine == "llama.cpp":
        if kind != "gguf":
            raise GrokquantError(f"{path}: the llama.cpp engine runs GGUF files only")
        return Artifact(Path(path), "gguf", engine, own_semantics)
    return Artifact(Path(path), kind, engine, semantics or own_semantics)


def scored_logits(art: Artifact, windows: Windows, batch_size: int = 8, job: PassWork | None = None
                  ) -> Iterator[torch.Tensor]:
    """Float32 logits [b, n_score, vocab] of the scored positions, a few windows at a time, in order;
    `job` keeps a streamed pass's hidden states between layers (evaluate/resume.py)."""
    if art.engine == "llama.cpp":
        yield from _llamacpp_logits(art.path, windows)
    else:
        yield from _torch_logits(art, windows, batch_size, job)


# ---- torch -----------------------------------------------------------------------------------------

@torch.no_grad()
def _torch_logits(art: Artifact, windows: Windows, batch_size: int, job: PassWork | None
                  ) -> Iterator[torch.Tensor]:
    from grokquant.grok.model import Grok2ForCausalLM

    with art.open() as source:
        weights = source.weights
        n_params = sum(math.prod(s) for s in source.config.all_shapes().values())
        if art.kind == "gguf":  # ggml's activation rounding hooks need the whole model
            if 4 * n_params > WHOLE_MODEL_BYTES:
                raise GrokquantError(f"{art.path}: too large for the torch engine; use --engine llama.cpp")
            model = weights.model(art.semantics)
        elif 4 * n_params <= WHOLE_MODEL_BYTES:
            model = Grok2ForCausalLM.from_checkpoint(weights, art.semantics)
        else:
            yield from _streamed_logits(weights, art.semantics, windows, batch_size, job)
            return
        span = windows.logit_span
        for i in range(0, len(windows.tokens), batch_size):
            yield model(windows.tokens[i:i + batch_size])[:, span]


def _streamed_logits(source, semantics: str, windows: Windows, batch_size: int, job: PassWork | None
                     ) -> Iterator[torch.Tensor]:
    """One decoder layer's dense part or one expert in memory at a time; the hidden states of every window
    wait between layers (and, with `job`, are saved after a layer every SAVE_SECONDS)."""
    from grokquant.grok.model import Grok2ForCausalLM
    from grokquant.grok.streaming import LayerStreamer

    cfg = source.config
    streamer = LayerStreamer(Grok2ForCausalLM.empty(cfg, semantics), source.tensor, windows.ctx)
    saved = job.saved_hidden() if job else None
    if job:
        job.streaming = True
    start, hidden = saved or (0, streamer.embed(windows.tokens, batch_size))
    for layer in range(start, cfg.num_hidden_layers):
        hidden = streamer.run(layer, hidden)
        if job and layer + 1 < cfg.num_hidden_layers and job.work.due():
            job.save_hidden(layer + 1, hidden)
    for h in hidden:
        yield streamer.head(h[:, windows.logit_span])


# ---- llama.cpp -------------------------------------------------------------------------------------

def _llamacpp_logits(path: Path, windows: Windows) -> Iterator[torch.Tensor]:
    if importlib.util.find_spec("llama_cpp") is None:
        raise GrokquantError("the llama.cpp engine needs llama-cpp-python (pip install 'grokquant[llama]')")
    with tempfile.TemporaryDirectory() as tmp:
        tokens_file, log_file = Path(tmp) / "tokens.npy", Path(tmp) / "stderr.txt"
        np.save(tokens_file, windows.tokens.numpy().astype(np.int32))
        cmd = [sys.executable, "-m", "grokquant.evaluate.engines", str(path), str(tokens_file), str(windows.n_score),
               str(torch.get_num_threads())]
        with open(log_file, "wb") as log:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log)
            try:
                header = proc.stdout.read(4)
                n_vocab = int(np.frombuffer(header, np.int32)[0]) if len(header) == 4 else 0
                size = windows.n_score * n_vocab * 4
                for _ in range(len(windows.tokens)):
                    data = proc.stdout.read(size) if n_vocab else b""
                    if len(data) != size or not n_vocab:
                        break
                    yield torch.from_numpy(np.frombuffer(data, np.float32).copy()).view(1, windows.n_score, n_vocab)
                else:
                    proc.stdout.close()
                    if proc.wait() == 0:
                        return
            finally:
                if proc.poll() is None:
                    proc.kill()
                proc.wait()
        tail = log_file.read_text(errors="replace").strip().splitlines()[-1:] or [f"exit code {proc.returncode}"]
        raise GrokquantError(f"{path}: llama.cpp failed: {tail[0]}")


def _llama_worker(path: str, tokens_file: str, n_score: str, threads: str) -> None:
    """Child process: evaluate each window from an empty cache, write the scored logits to stdout."""
    from grokquant.runtime.llama_engine import EXACT, open_llama

    tokens = np.load(tokens_file)
    n, ctx = tokens.shape
    n_score = int(n_score)
    llm = open_llama(path, n_ctx=ctx, n_batch=ctx, logits_all=True, verbose=False, n_threads=int(threads), **EXACT)
    out = sys.stdout.buffer
    out.write(np.int32(llm.n_vocab()).tobytes())
    for window in tokens:
        llm.reset()
        llm.eval(window.tolist())
        out.write(np.ascontiguousarray(llm.scores[ctx - n_score - 1: ctx - 1], dtype=np.float32).tobytes())
        out.flush()


if __name__ == "__main__":  # the llama.cpp child process
    _llama_worker(*sys.argv[1:])
