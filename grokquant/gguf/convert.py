"""Original checkpoint -> GGUF that stock llama.cpp loads, streamed tensor by tensor.

Order of work: plan every tensor (name, shape, type) from config.json and the recipe, write the
header, then read, quantize and append one tensor (one expert) at a time, the three steps overlapped
(io.pipeline). The file is written as `.NAME.incomplete`, its header re-read and validated, then
renamed into place; an interrupted run's recorded work is resumed (gguf/resume.py).
"""

from __future__ import annotations

import hashlib
import os
from glob import escape as glob_escape
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from grokquant.grok.checkpoint import Checkpoint
from grokquant.grok.config import GrokConfig
from grokquant.errors import GrokquantError
from grokquant.gguf.file import GGUFWriter, read_gguf
from grokquant import __version__
from grokquant.gguf.resume import Position, Resumable, fingerprint, partial_path
from grokquant.io.paths import check_output, full_disk_is_an_error, is_disk_full, output_lock
from grokquant.io.pipeline import WriteBehind, read_ahead
from grokquant.grok.names import gguf_tensors, release_names
from grokquant.quant.ggml.base import QUANTIZERS, quantize
from grokquant.quant.ggml.types import TYPES, GGMLType
from grokquant.quant.ggml.mixes import FTYPES, fallback, is_quantizable, requires_imatrix, tensor_type
from grokquant.quantize.recipe import GGUFRecipe
from grokquant.grok.tokenizer import load_tokenizer
from grokquant.gguf.vocab import CHAT_TEMPLATE, build_vocab

ROPE_MODES = ("plain", "yarn")
CHUNK_ELEMENTS = 1 << 24  # rows are quantized in chunks of about this many elements


@dataclass
class PlannedTensor:
    name: str  # GGUF name
    shape: tuple[int, ...]  # torch order
    type: GGMLType
    sources: list[str]  # release tensor names; several for stacked experts

    @property
    def nbytes(self) -> int:
        return self.type.nbytes(self.shape)


def plan(cfg: GrokConfig, recipe: GGUFRecipe, has_imatrix: bool = False) -> list[PlannedTensor]:
    return [PlannedTensor(gname, shape, choose_type(cfg, recipe, gname, shape, has_imatrix), release_names(gname, cfg))
            for gname, shape in gguf_tensors(cfg)]


def choose_type(cfg: GrokConfig, recipe: GGUFRecipe, gname: str, shape, has_imatrix: bool) -> GGMLType:
    if not is_quantizable(gname, len(shape)):
        return TYPES["F32"]
    override = recipe.override_for(gname)
    if override is not None:
        return fallback(TYPES[override], shape[-1])
    if recipe.pure:
        return fallback(TYPES[FTYPES[recipe.ftype][1]], shape[-1])
    return tensor_type(recipe.ftype, gname, shape, cfg.num_hidden_layers, cfg.num_local_experts, has_imatrix,
                       cfg.num_attention_heads // cfg.num_key_value_heads)


# ---- metadata -------------------------------------------------------------------------------------

# Header bytes per vocabulary entry when the tokenizer is not at hand (the token string, its type and its
# share of the merges: about 4.7 MB for a 131,072-token byte-level BPE); under 0.01% of a Grok 2 file.
VOCAB_HEADER_BYTES = 36


def needs_imatrix(cfg: GrokConfig, recipe: GGUFRecipe) -> bool:
    """Whether the recipe puts a type on some tensor that llama.cpp refuses to make without importance data."""
    return any(requires_imatrix(t.type.name, t.name, recipe.ftype) for t in plan(cfg, recipe, has_imatrix=True))


def file_bytes(cfg: GrokConfig, recipe: GGUFRecipe, tok=None, has_imatrix: bool = False) -> int:
    """Bytes of the file `convert` writes (one shard): the header as add_metadata builds it, every tensor and
    the alignment padding. Without the tokenizer `tok`, the vocabulary's share is estimated."""
    tensors = plan(cfg, recipe, has_imatrix)
    w = GGUFWriter(os.devnull)
    if tok is not None:
        add_metadata(w, cfg, tok, recipe, "plain", "grok-2")
    for t in tensors:
        w.add_tensor(t.name, t.shape, t.type)
    header = len(w.header_bytes()) + (0 if tok is not None else 2048 + VOCAB_HEADER_BYTES * cfg.vocab_size)
    last = w.tensors[-1]
    return header + last.offset + last.nbytes

def add_metadata(w: GGUFWriter, cfg: GrokConfig, tok, recipe: GGUFRecipe, rope: str, name: str) -> None:
    arch = "grok"
    w.add_str("general.architecture", arch)
    w.add_str("general.name", name)
    w.add_u32("general.file_type", FTYPES[recipe.ftype][0])
    w.add_u32("general.quantization_version", 2)
    w.add_u32("general.alignment", 32)
    w.add_u32(f"{arch}.block_count", cfg.num_hidden_layers)
    w.add_u32(f"{arch}.context_length", cfg.max_position_embeddings)
    w.add_u32(f"{arch}.embedding_length", cfg.hidden_size)
    w.add_u32(f"{arch}.feed_forward_length", cfg.intermediate_size)
    w.add_u32(f"{arch}.expert_feed_forward_length", cfg.moe_intermediate_size)
    w.add_u32(f"{arch}.attention.head_count", cfg.num_attention_heads)
    w.add_u32(f"{arch}.attention.head_count_kv", cfg.num_key_value_heads)
    w.add_u32(f"{arch}.attention.key_length", cfg.head_dim)
    w.add_u32(f"{arch}.attention.value_length", cfg.head_dim)
    w.add_u32(f"{arch}.rope.dimension_count", cfg.head_dim)
    w.add_f32(f"{arch}.rope.freq_base", cfg.rope_theta)
    w.add_f32(f"{arch}.attention.layer_norm_rms_epsilon", cfg.rms_norm_eps)
    w.add_u32(f"{arch}.expert_count", cfg.num_local_experts)
    w.add_u32(f"{arch}.expert_used_count", cfg.num_experts_per_tok)
    w.add_f32(f"{arch}.attn_logit_softcapping", cfg.attn_logit_softcapping)
    w.add_f32(f"{arch}.router_logit_softcapping", cfg.router_logit_softcapping)
    if cfg.final_logit_softcapping:
        w.add_f32(f"{arch}.final_logit_softcapping", cfg.final_logit_softcapping)
    if rope == "yarn":  # llama.cpp's own converter reads rope_type "original" as YaRN
        w.add_str(f"{arch}.rope.scaling.type", "yarn")
        w.add_f32(f"{arch}.rope.scaling.factor", cfg.scaling_factor)
        w.add_u32(f"{arch}.rope.scaling.original_context_length", cfg.original_max_position_embeddings)
        w.add_f32(f"{arch}.rope.scaling.yarn_ext_factor", cfg.extrapolation_factor)
        w.add_f32(f"{arch}.rope.scaling.yarn_attn_factor", cfg.attn_factor)
        w.add_f32(f"{arch}.rope.scaling.yarn_beta_fast", cfg.beta_fast)
        w.add_f32(f"{arch}.rope.scaling.yarn_beta_slow", cfg.beta_slow)
    w.add_u32(f"{arch}.attention.temperature_length", cfg.attn_temperature_len)
    w.add_f32(f"{arch}.attention.output_scale", cfg.attn_scale)
    w.add_f32(f"{arch}.embedding_scale", cfg.embedding_multiplier_scale)
    w.add_f32(f"{arch}.logit_scale", cfg.output_multiplier_scale)

    vocab = build_vocab(tok, cfg.vocab_size)
    w.add_str("tokenizer.ggml.model", "gpt2")
    w.add_str("tokenizer.ggml.pre", "grok-2")
    w.add_array("tokenizer.ggml.tokens", vocab.tokens, 8)
    w.add_array("tokenizer.ggml.token_type", vocab.token_types, 5)
    w.add_array("tokenizer.ggml.merges", vocab.merges, 8)
    w.add_u32("tokenizer.ggml.eos_token_id", vocab.eos_id)
    if vocab.pad_id is not None:
        w.add_u32("tokenizer.ggml.padding_token_id", vocab.pad_id)
    if vocab.eot_id is not None:
        w.add_u32("tokenizer.ggml.eot_token_id", vocab.eot_id)
    w.add_bool("tokenizer.ggml.add_bos_token", False)
    w.add_bool("tokenizer.ggml.add_eos_token", False)
    w.add_str("tokenizer.chat_template", CHAT_TEMPLATE)


# ---- tensor data ----------------------------------------------------------------------------------

def tensor_sources(ckpt: Checkpoint, t: PlannedTensor, imatrix: dict[str, torch.Tensor] | None, skip: int = 0):
    """(weights, importance or None) of each source of t (one expert of a stacked tensor) as stored (bf16),
    after the first `skip` (written by an interrupted run)."""
    imp = imatrix.get(t.name) if imatrix else None
    for i, source in enumerate(t.sources):
        if i < skip:
            continue
        x = ckpt.tensor(source)
        qw = None
        if imp is not None and t.type.name not in ("F32", "F16", "BF16"):
            qw = imp[i if imp.shape[0] > 1 else 0]
        yield (x[None] if x.dim() == 1 else x), qw


def quantized_rows(x: torch.Tensor, t: PlannedTensor, qw: torch.Tensor | None) -> Iterator[np.ndarray]:
    """x quantized to t's type a chunk of rows at a time (each chunk widened to float32 as it goes)."""
    step = max(1, CHUNK_ELEMENTS // x.shape[-1])
    for r in range(0, x.shape[0], step):
        yield quantize(x[r:r + step], t.type.name, qw).numpy()


def split_plan(tensors: list[PlannedTensor], max_bytes: int | None) -> list[list[PlannedTensor]]:
    if not max_bytes:
        return [tensors]
    shards, current, size = [], [], 0
    for t in tensors:
        if current and size + t.nbytes > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(t)
        size += t.nbytes
    shards.append(current)
    return shards


def shard_paths(out: Path, n: int) -> list[Path]:
    if n == 1:
        return [out]
    stem = out.name[:-5] if out.name.endswith(".gguf") else out.name
    return [out.with_name(f"{stem}-{i + 1:05d}-of-{n:05d}.gguf") for i in range(n)]


def validate(path: Path, expected: list[PlannedTensor], data: bool = True) -> None:
    """Re-read a written file: tensor count, names, shapes, types, the file's length, and (with `data`)
    finite scales. convert checks every chunk before writing it, so it re-reads only the header."""
    f = read_gguf(path)
    try:
        if [n for n in f.tensors] != [t.name for t in expected]:
            raise GrokquantError(f"{path}: tensor list differs from the plan")
        end = f.data_start + max((i.offset + i.nbytes for i in f.tensors.values()), default=0)
        if Path(path).stat().st_size < end:
            raise GrokquantError(f"{path}: truncated ({Path(path).stat().st_size} of {end} bytes)")
        for t in expected:
            info = f.tensors[t.name]
            if info.shape != tuple(t.shape) or info.type.id != t.type.id:
                raise GrokquantError(f"{path}: {t.name} is {info.type.name}{list(info.shape)}, "
                                     f"planned {t.type.name}{list(t.shape)}")
            if not data:
                continue
            rows = t.nbytes // t.type.row_bytes(t.shape[-1])
            step = max(1, CHUNK_ELEMENTS // t.shape[-1])  # a chunk at a time: no copy of a whole stacked tensor
            for first in range(0, rows, step):
                check_finite(path, t, f.raw(t.name, first, min(step, rows - first)))
    finally:
        f.close()


def check_finite(where, t: PlannedTensor, raw: np.ndarray) -> None:
    """Raise if whole rows `raw` of tensor t hold a non-finite fp16 block scale (or, for float types, value)."""
    q = QUANTIZERS[t.type.name]
    if q.fp16_scales is not None:  # a block type's fp16 scale bytes
        values, kind = raw.reshape(-1, t.type.block_bytes)[:, q.fp16_scales].copy(), "F16"
    elif hasattr(q, "fp16_scale_bytes"):  # IQ1_M: spread over nibbles
        blocks = torch.from_numpy(raw.reshape(-1, t.type.block_bytes).copy())
        values, kind = q.fp16_scale_bytes(blocks).numpy(), "F16"
    else:
        values, kind = raw, t.type.name
    if not _all_finite(values, kind):
        raise GrokquantError(f"{where}: {t.name} has non-finite scales or values")


# exponent bits of IEEE formats: all ones means inf or NaN
_EXPONENT = {"F16": (np.uint16, 0x7C00), "BF16": (np.uint16, 0x7F80), "F32": (np.uint32, 0x7F800000)}


def _all_finite(raw: np.ndarray, kind: str) -> bool:
    dtype, mask = _EXPONENT[kind]
    bits = np.ascontiguousarray(raw).view(dtype)
    return not np.any((bits & dtype(mask)) == dtype(mask))

def convert(checkpoint: str | Path, out: str | Path, recipe: GGUFRecipe, rope: str = "plain",
            split_max_bytes: int | None = None, imatrix: dict[str, torch.Tensor] | None = None,
            force: bool = False, name: str | None = None,
            progress: Callable[[PlannedTensor, int], None] | None = None,
            prequantized: Callable[[PlannedTensor], np.ndarray | None] | None = None,
            extra_metadata: dict[str, str] | None = None,
            on_plan: Callable[[list[PlannedTensor], int], None] | None = None,
            notice: Callable[[str], None] | None = None) -> list[Path]:
    """Write `out` (or its split shards); returns the written paths. Resumes the work an interrupted run
    with the same inputs recorded (gguf/resume.py), except with `prequantized`.

    `on_plan(tensors, done_bytes)` is called once with every planned tensor and the bytes of those a
    resumed run already wrote, before anything is written. `progress(tensor, nbytes)` is called with 0
    when a tensor starts and its size when it is written. `prequantized(tensor)` may supply a tensor's
    bytes (calibrated quantization did the rounding); `extra_metadata` adds string keys to the header;
    `notice(message)` hears of resumed work and of removed leftovers.
    """
    if rope not in ROPE_MODES:
        raise GrokquantError(f"unknown rope mode {rope!r} (plain or yarn)")
    if not isinstance(recipe, GGUFRecipe) or (recipe.calibrated and prequantized is None):
        raise GrokquantError(f"recipe {recipe.name} needs calibration data: use `grokquant quantize`")
    out = Path(out)
    ckpt = Checkpoint.open(checkpoint)
    try:
        cfg = ckpt.config
        tok = load_tokenizer(ckpt.tokenizer_path)
        tensors = plan(cfg, recipe, has_imatrix=imatrix is not None or recipe.calibrated)
        if imatrix:
            _check_imatrix(imatrix, tensors)
        if prequantized is None:
            _check_imatrix_present(imatrix, tensors, recipe.ftype)
        shards = split_plan(tensors, split_max_bytes)
        paths = shard_paths(out, len(shards))
        for p in paths:
            check_output(p, [checkpoint], directory=False, force=force)
        writers = [GGUFWriter(partial_path(p)) for p in paths]
        add_metadata(writers[0], cfg, tok, recipe, rope, name or Path(checkpoint).name)
        for key, value in (extra_metadata or {}).items():
            writers[0].add_str(key, value)
        for i, (w, shard) in enumerate(zip(writers, shards)):
            if len(shards) > 1:
                w.add_u16("split.no", i)
                w.add_u16("split.count", len(shards))
                w.add_i32("split.tensors.count", len(tensors))
            for t in shard:
                w.add_tensor(t.name, t.shape, t.type)
        headers = [w.header_bytes() for w in writers]
        fp = None if prequantized else fingerprint(__version__, ckpt.identity(), *headers, _imatrix_bytes(imatrix))
        job = Resumable(out, paths, fp, notice)
        with output_lock(out):
            _remove_dead_temporaries(paths, notice)
            pos = job.start(headers)
            if on_plan:
                started = shards[pos.shard][:pos.tensor] if pos.shard < len(shards) else []
                on_plan(tensors, sum(t.nbytes for s in shards[:pos.shard] for t in s) + sum(t.nbytes for t in started))
            kept = None  # what a failed run leaves for the next, said with the error
            with full_disk_is_an_error(out, sum(t.nbytes for t in tensors), kept=lambda: kept):
                try:
                    for i in range(pos.shard, len(shards)):
                        _write_shard(writers[i], i, shards[i], pos if i == pos.shard else Position(i), job,
                                     ckpt, imatrix, prequantized, progress)
                    job.finish(paths)
                except BaseException as exc:
                    kept = job.after_failure(exc)
                    if kept and notice and not is_disk_full(exc):
                        notice(kept)
                    raise
    finally:
        ckpt.close()
    return paths


def _write_shard(w: GGUFWriter, i: int, shard: list[PlannedTensor], pos: Position, job: Resumable,
                 ckpt: Checkpoint, imatrix, prequantized, progress) -> None:
    """Write (or finish) shard i from `pos`, check its header and tell `job` it is complete."""
    if pos.offset:
        t = shard[pos.tensor] if pos.tensor < len(shard) else None
        w.reopen(pos.offset, pos.tensor, pos.sources * t.nbytes // len(t.sources) if t else 0)
    else:
        pos = Position(i)
        w.write_header()
    try:
        _write_tensors(w, i, ckpt, shard, pos, job, imatrix, prequantized, progress)
        w.close()
    except BaseException:
        w.abort()
        raise
    validate(w.path, shard, data=False)  # every chunk was checked before it was written
    job.shard_done(i)


def _imatrix_bytes(imatrix: dict[str, torch.Tensor] | None) -> bytes:
    if not imatrix:
        return b""
    h = hashlib.sha256()
    for key in sorted(imatrix):
        h.update(key.encode())
        h.update(imatrix[key].float().contiguous().numpy().tobytes())
    return h.digest()


def _remove_dead_temporaries(paths: list[Path], notice: Callable[[str], None] | None) -> None:
    """`.NAME.tmp-PID` files of runs before resumable output (the lock is held: their writers are gone)."""
    for p in paths:
        for tmp in p.parent.glob(f".{glob_escape(p.name)}.tmp-*"):
            size = tmp.stat().st_size
            tmp.unlink(missing_ok=True)
            if notice:
                notice(f"removed {tmp} ({size / 1e9:.3f} GB), left by a run that stopped")


def _write_tensors(w: GGUFWriter, shard_index: int, ckpt: Checkpoint, shard: list[PlannedTensor], pos: Position,
                   job: Resumable, imatrix: dict[str, torch.Tensor] | None, prequantized, progress) -> None:
    """Read, quantize and write the shard's tensors from `pos` on as a pipeline: the next source is read
    (and merged) ahead on one thread and the quantized chunks are checked and written behind on another,
    while this thread quantizes; the bytes and their order are those of doing it one step after the other.
    Each finished source is reported to `job` (which records some of them for a resumed run)."""

    def sources():
        for k in range(pos.tensor, len(shard)):
            t = shard[k]
            skip = pos.sources if k == pos.tensor else 0
            data = prequantized(t) if prequantized else None
            if data is not None:
                yield k, t, skip, data, None
            else:
                for s, (x, qw) in enumerate(tensor_sources(ckpt, t, imatrix, skip), start=skip):
                    yield k, t, s, x, qw

    def write(item) -> None:  # on the writer thread, which alone calls `progress`
        k, t, chunk, first, sources_done = item
        if first and progress:
            progress(t, 0)  # starting t
        check_finite(w.path, t, chunk)
        w.write(t.name, chunk)
        if sources_done is not None:
            at = Position(shard_index, k, sources_done) if sources_done < len(t.sources) else Position(shard_index, k + 1)
            job.reached(w.file, replace(at, offset=w.file.tell()))
            if sources_done == len(t.sources) and progress:
                progress(t, t.nbytes)  # t written

    writer = WriteBehind(write, depth=4)
    try:
        for k, t, s, x, qw in read_ahead(sources(), depth=1):
            first = s == (pos.sources if k == pos.tensor else 0)
            if isinstance(x, np.ndarray):  # prequantized: the whole tensor's bytes
                writer.submit((k, t, x, True, len(t.sources)))
                continue
            pending = None  # each chunk goes out once the next exists, so the last one is known
            for chunk in quantized_rows(x, t, qw):
                if pending is not None:
                    writer.submit((k, t, pending, first, None))
                    first = False
                pending = chunk
            del x
            writer.submit((k, t, pending, first, s + 1))
        writer.close()
    except BaseException:
        writer.abort()
        raise


def _check_imatrix(imatrix: dict[str, torch.Tensor], tensors: list[PlannedTensor]) -> None:
    for t in tensors:
        imp = imatrix.get(t.name)
        if imp is None:
            continue
        n_mat = t.shape[0] if len(t.shape) == 3 else 1
        if tuple(imp.shape) != (n_mat, t.shape[-1]):
            raise GrokquantError(f"imatrix entry {t.name} has shape {list(imp.shape)}, "
                                 f"expected {[n_mat, t.shape[-1]]}")


def _check_imatrix_present(imatrix: dict[str, torch.Tensor] | None, tensors: list[PlannedTensor],
                           ftype: str) -> None:
    """llama-quantize's rule: the lowest-bit types are refused without importance data (their searches
    give garbage), before anything is written."""
    for t in tensors:
        if requires_imatrix(t.type.name, t.name, ftype) and (not imatrix or t.name not in imatrix):
            what = "the imatrix has no entry for it" if imatrix else "no --imatrix was given"
            raise GrokquantError(f"{t.name} would be {t.type.name}, which needs an importance matrix, and {what}: "
                                 f"run `grokquant calibrate --imatrix` first, or `grokquant quantize` with a recipe")


def planned_summary(tensors: list[PlannedTensor]) -> dict[str, int]:
    """Bytes per GGML type (for the end-of-run summary)."""
    out: dict[str, int] = {}
    for t in tensors:
        out[t.type.name] = out.get(t.type.name, 0) + t.nbytes
    return out

