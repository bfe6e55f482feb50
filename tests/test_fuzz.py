"""Fuzzing every reader of untrusted input (issue #17): GGUF files, checkpoint safetensors headers,
config.json and the tokenizer, GPTQ artifacts, recipes, calibration text and imatrix files.

Each reader starts from valid inputs the project itself made, then reads deterministic mutations of
them: truncations and bit flips (biased toward headers and metadata), absurd sizes in length, count,
shape and offset fields, and wrong types in JSON/YAML values and type fields. Every mutated input must
either read (a harmless flip) or be refused with a one-line GrokquantError; any other exception is a
reader bug. Each read runs under tracemalloc (Python's and numpy's allocations) and must stay under
PEAK plus the input's size, finish within SECONDS, and write nothing beside its input. One subprocess
per reader family checks the same through the CLI: exit code 2, one line on stderr, no output.

`pytest -s tests/test_fuzz.py` prints how many inputs each reader was given (COUNTS).
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import time
import tracemalloc
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch
import yaml

from grokquant.errors import GrokquantError
from grokquant.gguf import file as gguf
from grokquant.io.safetensors_file import read_header

MB = 2**20
PEAK = 64 * MB  # allowed beyond the input's own size
SECONDS = 2.0  # per input: a corrupt count must not become an endless loop
U64 = (0, 1, 2**31, 2**32 - 1, 2**62, 2**64 - 1)
U32 = (0, 1, 2**31, 2**32 - 1)
ABSURD = (2**31, 2**32 - 1, 2**62, 2**64 - 1, -1, -(2**31), -(2**63), 0)
# values put where a JSON/YAML reader expects something else
WRONG = (None, True, 0, -1, 2**62, 2**64 + 1, 1.5, 1e308, float("nan"), float("inf"), "", "x", "4",
         "line\nbreak", [], [1, 2], {}, {"a": {"b": [1]}}, "\udcff")
SHARD = "pytorch_model-00006-TP-000.safetensors"  # experts' w1, rank 0
COMMON = "pytorch_model-00000-TP-common.safetensors"  # the embedding
CHECKPOINT_EVERY = 3  # of the header cases, through Checkpoint.open (which reads 39 headers and the tokenizer)

COUNTS: dict[str, int] = {}

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- running cases ---------------------------------------------------------------------------------

@dataclass
class Mutation:
    """A mutated input: `head` + seed[skip:end], then `patches` (offset, bytes) written over it."""

    label: str
    head: bytes = b""
    skip: int = 0
    end: int | None = None
    patches: tuple = ()

    def content(self, seed: bytes) -> bytes:
        out = bytearray(self.head)
        out += seed[self.skip:self.end]
        for offset, data in self.patches:
            if offset + len(data) <= len(out):
                out[offset:offset + len(data)] = data
        return bytes(out)


def listing(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in folder.rglob("*") if p.is_file()}


class TooSlow(BaseException):
    """Raised by the alarm in a reader that runs far past SECONDS (not an Exception: readers must not catch it)."""


def _too_slow(*_):
    raise TooSlow


class Fuzz:
    """Runs one reader's cases and collects every failure (so one run names all the bugs)."""

    def __init__(self, reader: str, folder: Path, cases: int):
        self.reader, self.folder, self.failures = reader, folder, []
        COUNTS[reader] = cases

    def __call__(self, label: str, call, size: int) -> bool:
        """Run `call()` on one input of `size` bytes; True when it read the input without refusing it."""
        before = listing(self.folder)
        tracemalloc.start()
        start = time.perf_counter()
        ok, problem = False, None
        signal.signal(signal.SIGALRM, _too_slow)
        signal.setitimer(signal.ITIMER_REAL, 10 * SECONDS)  # an endless loop fails the test instead of hanging it
        try:
            call()
            ok = True
        except GrokquantError as exc:
            if "\n" in str(exc) or not str(exc):
                problem = f"error message not one line: {str(exc)[:200]!r}"
        except TooSlow:
            problem = f"still running after {10 * SECONDS:.0f} s"
        except Exception as exc:  # a reader bug: report it with where it was raised
            tb = exc.__traceback__
            while tb.tb_next is not None:
                tb = tb.tb_next
            where = f"{Path(tb.tb_frame.f_code.co_filename).name}:{tb.tb_lineno}"
            problem = f"{type(exc).__name__} at {where}: {str(exc)[:200]!r}"
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            seconds = time.perf_counter() - start
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
        if problem is None and peak > PEAK + size:
            problem = f"allocated {peak / MB:.0f} MB for a {size / MB:.1f} MB input"
        if problem is None and seconds > SECONDS:
            problem = f"took {seconds:.1f} s"
        if problem is None and listing(self.folder) != before:
            problem = "wrote into the input's folder"
        if problem:
            self.failures.append(f"{self.reader}: {label}: {problem}")
        return ok

    def check(self) -> None:
        assert not self.failures, f"{len(self.failures)} failure(s):\n" + "\n".join(self.failures[:40])


def flips(rng: random.Random, seed: bytes, lo: int, hi: int, n: int, what: str, max_bits: int = 1) -> list[Mutation]:
    """`n` mutations, each flipping 1..max_bits random bits in seed[lo:hi]."""
    out = []
    for _ in range(n):
        patches = []
        for _ in range(rng.randint(1, max_bits)):
            pos, bit = rng.randrange(lo, hi), rng.randrange(8)
            patches.append((pos, bytes([seed[pos] ^ (1 << bit)])))
        out.append(Mutation(f"{what}: flip " + ", ".join(f"bit of byte {p}" for p, _ in patches), patches=tuple(patches)))
    return out


def cuts(rng: random.Random, seed: bytes, head: int, n: int, first: int = 16) -> list[Mutation]:
    """Truncations: every point in the `first` bytes, most others within the header, a few in the data."""
    points = {*range(min(head, first)), *(rng.randrange(head) for _ in range(n)),
              *(rng.randrange(head, len(seed)) for _ in range(max(1, n // 5)) if head < len(seed)), len(seed) - 1}
    return [Mutation(f"truncated to {p} of {len(seed)} bytes", end=p) for p in sorted(points)]


def text_cases(rng: random.Random, text: bytes, n_cut: int, n_flip: int, what: str, first: int = 16) -> list[Mutation]:
    return cuts(rng, text, len(text), n_cut, first) + flips(rng, text, 0, len(text), n_flip, what, max_bits=3)


def whole(label: str, data: bytes) -> Mutation:
    """A replacement input: none of the seed's bytes kept."""
    return Mutation(label, head=data, skip=2**62)


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


# ---- GGUF: the header's fields, for targeted mutations ----------------------------------------------

@dataclass
class Field:
    offset: int
    fmt: str
    role: str


def gguf_layout(data: bytes) -> tuple[list[Field], list[tuple[str, int, int | None]], int]:
    """Every fixed-size field of a valid GGUF header, each key's (name, type, array type), the header's end."""
    fields, kvs, pos = [], [], 4

    def take(fmt, role):
        nonlocal pos
        (value,) = struct.unpack_from(fmt, data, pos)
        fields.append(Field(pos, fmt, role))
        pos += struct.calcsize(fmt)
        return value

    def string(role):
        nonlocal pos
        n = take("<Q", role)
        pos += n
        return data[pos - n:pos].decode()

    take("<I", "version")
    n_tensors, n_kv = take("<Q", "tensor count"), take("<Q", "key count")
    for _ in range(n_kv):
        key = string("key length")
        vtype = take("<I", f"type of {key}")
        elem = None
        if vtype == gguf.STRING:
            string(f"string length of {key}")
        elif vtype == gguf.ARRAY:
            elem, count = take("<I", f"array type of {key}"), take("<Q", f"array count of {key}")
            if elem == gguf.STRING:
                for _ in range(count):
                    string(f"array string length of {key}")
            else:
                pos += count * struct.calcsize(gguf._SCALAR[elem])
        else:
            take(gguf._SCALAR[vtype], f"value of {key}")
        kvs.append((key, vtype, elem))
    for _ in range(n_tensors):
        name = string("tensor name length")
        n_dims = take("<I", f"dims of {name}")
        for _ in range(n_dims):
            take("<Q", f"dim of {name}")
        take("<I", f"ggml type of {name}")
        take("<Q", f"offset of {name}")
    return fields, kvs, pos


def gguf_rebuilt(seed_file: gguf.GGUFFile, kvs, label: str, values: dict | None = None, drop=(),
                 tensors: dict | None = None) -> Mutation:
    """The seed's data under a header written by GGUFWriter: metadata `values` ((type, value, array type)
    per key) replaced or added, keys in `drop` left out, tensor infos from `tensors` where given."""
    w = gguf.GGUFWriter("unused")
    values = values or {}
    for key, vtype, elem in kvs:
        if key in drop:
            continue
        if key in values:
            w.kv.append((key, *values.pop(key)))
        else:
            w.kv.append((key, vtype, seed_file.metadata[key], elem))
    for key, v in values.items():
        w.kv.append((key, *v))
    w.tensors = [(tensors or {}).get(t.name, t) for t in seed_file.tensors.values()
                 if (tensors or {}).get(t.name, t) is not None]
    return Mutation(label, head=w.header_bytes(), skip=seed_file.data_start)


LENGTHS = ("key length", "string length", "array string length", "tensor name length")


def gguf_cases(rng: random.Random, seed: bytes, seed_file: gguf.GGUFFile, n_cut: int, n_flip: int,
               n_fields: int) -> list[Mutation]:
    """Truncations, bit flips, absurd counts/lengths/dims/offsets and wrong type fields of a GGUF file."""
    fields, kvs, header_end = gguf_layout(seed)
    cases = cuts(rng, seed, header_end, n_cut)
    cases += flips(rng, seed, 0, header_end, n_flip, "header")
    cases += flips(rng, seed, 0, header_end, n_flip // 4, "header", max_bits=8)
    cases += flips(rng, seed, header_end, len(seed), 4, "data")
    # the fields by role (one of each kind of string length, not 500 token lengths): the counts and lengths
    # always, a sample of the others (values, types, dims, offsets)
    by_role: dict[str, list[Field]] = {}
    for f in fields:
        by_role.setdefault(f.role.split(" of ")[0] if f.role.startswith(LENGTHS) else f.role, []).append(f)
    always = [rng.choice(fs) for role, fs in by_role.items() if " of " not in role]
    others = [rng.choice(fs) for role, fs in by_role.items() if " of " in role]
    for f in always + rng.sample(others, min(n_fields, len(others))):
        if f.role.startswith(("type of", "array type of", "ggml type of")):  # every other type, and ids beyond
            values = [v for v in (*range(13), 13, 41, 255, 2**31) if v != struct.unpack_from(f.fmt, seed, f.offset)[0]]
            values = rng.sample(values, 4)
        elif f.fmt in ("<Q", "<I"):
            values = U64 if f.fmt == "<Q" else U32
        elif f.fmt in ("<q", "<i"):
            values = [v for v in ABSURD if -(2 ** (8 * struct.calcsize(f.fmt) - 1)) <= v < 2 ** (8 * struct.calcsize(f.fmt) - 1)]
        else:
            continue
        for v in values:
            cases.append(Mutation(f"{f.role} = {v}", patches=((f.offset, struct.pack(f.fmt, v)),)))
    return cases


# ---- GGUF files: read_gguf, every tensor's bytes, GGUFWeights and its tokenizer ---------------------

@pytest.fixture(scope="module")
def gguf_seed(tiny_tp8, tmp_path_factory) -> Path:
    from grokquant.gguf.convert import convert
    from grokquant.quantize.recipe import GGUFRecipe

    return convert(tiny_tp8, tmp_path_factory.mktemp("seed") / "tiny-q8_0.gguf", GGUFRecipe("q8_0", "q8_0"))[0]


def gguf_semantic(seed_file: gguf.GGUFFile, kvs) -> list[Mutation]:
    """Well-formed GGUF files whose metadata or tensor infos are wrong for a Grok 2 model."""
    S, U32T, F32T, ARR = gguf.STRING, gguf.U32, gguf.F32, gguf.ARRAY
    specs = {
        "general.architecture": [(U32T, 7), (S, "llama"), (ARR, [1], gguf.U8)],
        "grok.embedding_length": [(S, "256"), (U32T, 0), (U32T, 2**32 - 1), (gguf.I32, -256), (F32T, 256.5)],
        "grok.block_count": [(U32T, 2**32 - 1), (U32T, 0), (S, "2"), (gguf.U64, 2**62), (U32T, 3)],
        "grok.expert_count": [(U32T, 2**31), (U32T, 0), (gguf.BOOL, True), (U32T, 4)],
        "grok.expert_used_count": [(U32T, 99), (F32T, float("nan"))],
        "grok.attention.head_count": [(U32T, 0), (U32T, 3), (S, "x")],
        "grok.attention.head_count_kv": [(U32T, 0), (U32T, 3)],
        "grok.attention.layer_norm_rms_epsilon": [(F32T, float("nan")), (F32T, -1.0), (S, "1e-5")],
        "grok.context_length": [(U32T, 0), (gguf.I64, -1)],
        "grok.rope.freq_base": [(F32T, float("inf")), (S, "x")],
        "split.count": [(gguf.U16, 2), (gguf.U16, 65535), (U32T, 2**32 - 1), (S, "two"), (gguf.I32, -3)],
        "general.alignment": [(U32T, 0), (U32T, 3), (U32T, 2**31), (S, "32"), (F32T, 32.0)],
        "tokenizer.ggml.tokens": [(ARR, [5, 6], U32T), (S, "abc"), (ARR, [], S), (ARR, ["\x00", "Ā"] * 300, S)],
        "tokenizer.ggml.token_type": [(ARR, ["1"] * 3, S), (ARR, [9] * 600, gguf.I32), (S, "1"), (ARR, [], gguf.I32),
                                      (ARR, [1] * 512, gguf.I32)],
        "tokenizer.ggml.eos_token_id": [(U32T, 2**32 - 1), (S, "2")],
    }
    out = []
    for key, variants in specs.items():
        for v in variants:
            vtype, value, elem = (*v, None)[:3]
            out.append(gguf_rebuilt(seed_file, kvs, f"metadata {key} = {value!r:.30} (type {vtype})",
                                    {key: (vtype, value, elem)}))
    for key in ("general.architecture", "grok.embedding_length", "grok.block_count", "grok.attention.head_count",
                "tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "grok.attention.layer_norm_rms_epsilon"):
        out.append(gguf_rebuilt(seed_file, kvs, f"metadata without {key}", drop=(key,)))
    infos = seed_file.tensors
    for name, change in (("token_embd.weight", None), ("output_norm.weight", None),
                         ("blk.1.ffn_gate_exps.weight", None),
                         ("token_embd.weight", dict(shape=(512, 128))),
                         ("blk.0.attn_q.weight", dict(shape=(256, 288))),
                         ("blk.0.ffn_up_exps.weight", dict(shape=(512, 256))),
                         ("blk.0.ffn_down_exps.weight", dict(shape=(2, 256, 512))),
                         ("blk.0.attn_norm.weight", dict(type=gguf.BY_ID[8], shape=(256,))),
                         ("blk.0.attn_k.weight", dict(type=gguf.BY_ID[0])),
                         ("output.weight", dict(offset=infos["token_embd.weight"].offset)),
                         ("output_norm.weight", dict(offset=2**40))):
        new = None if change is None else replace(infos[name], **change)
        out.append(gguf_rebuilt(seed_file, kvs, f"tensor {name} " + ("left out" if change is None else f"with {change}"),
                                tensors={name: new}))
    return out


@pytest.fixture(scope="module")
def gguf_inputs(gguf_seed):
    seed = gguf_seed.read_bytes()
    seed_file = gguf.read_gguf(gguf_seed)
    fields, kvs, _ = gguf_layout(seed)
    rng = random.Random(17)
    cases = gguf_cases(rng, seed, seed_file, n_cut=40, n_flip=60, n_fields=25) + gguf_semantic(seed_file, kvs)
    return seed, cases


def read_gguf_fully(path: Path) -> None:
    """What `run` and `eval` do with a GGUF before computing: header, tokenizer, every tensor's bytes."""
    from grokquant.gguf.vocab import tokenizer_from_gguf
    from grokquant.gguf.weights import GGUFWeights

    f = gguf.read_gguf(path)
    try:
        for name in f.tensors:
            f.raw(name)
    finally:
        f.close()
    w = GGUFWeights(path)
    try:
        tokenizer_from_gguf(w.metadata).encode("fuzzing the header")
        w.tensor("model.layers.1.block_sparse_moe.experts.7.w2.weight")
        w.tensor("model.norm.weight")
    finally:
        w.close()


def test_gguf_reader(gguf_inputs, tmp_path):
    seed, cases = gguf_inputs
    fuzz = Fuzz("gguf", tmp_path, len(cases))
    path = tmp_path / "fuzzed.gguf"
    path.write_bytes(seed)
    assert fuzz("the seed", lambda: read_gguf_fully(path), len(seed))  # the seed itself reads
    for case in cases:
        data = case.content(seed)
        path.write_bytes(data)
        fuzz(case.label, lambda: read_gguf_fully(path), len(data))
    fuzz.check()


# ---- imatrix files -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def imatrix_inputs(tmp_path_factory):
    from grokquant.calibrate.imatrix import save_imatrix

    g = torch.Generator().manual_seed(0)
    sums = {"blk.0.ffn_gate_exps.weight": torch.rand(8, 256, generator=g) * 50,
            "blk.0.attn_q.weight": torch.rand(1, 256, generator=g) * 50,
            "blk.1.ffn_down_exps.weight": torch.rand(8, 512, generator=g) * 50}
    counts = {"blk.0.ffn_gate_exps.weight": torch.tensor([[5.0], [0.0], [7], [1], [2], [3], [4], [9]]),
              "blk.0.attn_q.weight": torch.tensor([[64.0]]),
              "blk.1.ffn_down_exps.weight": torch.full((8, 1), 8.0)}
    path = tmp_path_factory.mktemp("seed") / "seed.imatrix.gguf"
    save_imatrix(path, sums, counts, datasets=["builtin"], chunk_count=4, chunk_size=64)
    seed = path.read_bytes()
    seed_file = gguf.read_gguf(path)
    _, kvs, _ = gguf_layout(seed)
    rng = random.Random(18)
    cases = gguf_cases(rng, seed, seed_file, n_cut=50, n_flip=70, n_fields=40)
    infos = seed_file.tensors
    F16, Q8 = gguf.BY_ID[1], gguf.BY_ID[8]
    for label, values, tensors in (
            ("general.type as a number", {"general.type": (gguf.U32, 1, None)}, {}),
            ("general.type other", {"general.type": (gguf.STRING, "model", None)}, {}),
            ("no counts", {}, {"blk.0.attn_q.weight.counts": None}),
            ("no sums", {}, {"blk.0.attn_q.weight.in_sum2": None}),
            ("sums as F16", {}, {"blk.0.attn_q.weight.in_sum2": replace(infos["blk.0.attn_q.weight.in_sum2"], type=F16)}),
            ("sums as Q8_0", {}, {"blk.0.ffn_gate_exps.weight.in_sum2": replace(
                infos["blk.0.ffn_gate_exps.weight.in_sum2"], type=Q8)}),
            ("counts as F16", {}, {"blk.0.ffn_gate_exps.weight.counts": replace(
                infos["blk.0.ffn_gate_exps.weight.counts"], type=F16, shape=(8, 2))}),
            ("counts for 4 experts", {}, {"blk.0.ffn_gate_exps.weight.counts": replace(
                infos["blk.0.ffn_gate_exps.weight.counts"], shape=(4, 1))}),
            ("counts 8x2", {}, {"blk.0.ffn_gate_exps.weight.counts": replace(
                infos["blk.0.ffn_gate_exps.weight.counts"], shape=(4, 2))}),
            ("sums 3-d", {}, {"blk.0.ffn_gate_exps.weight.in_sum2": replace(
                infos["blk.0.ffn_gate_exps.weight.in_sum2"], shape=(2, 4, 256))}),
            ("sums 4x512", {}, {"blk.0.ffn_gate_exps.weight.in_sum2": replace(
                infos["blk.0.ffn_gate_exps.weight.in_sum2"], shape=(4, 512))}),
            ("sums 1-d", {}, {"blk.0.attn_q.weight.in_sum2": replace(infos["blk.0.attn_q.weight.in_sum2"], shape=(256,))}),
            ("counts 1-d", {}, {"blk.0.attn_q.weight.counts": replace(infos["blk.0.attn_q.weight.counts"], shape=(1,))}),
    ):
        cases.append(gguf_rebuilt(seed_file, kvs, label, values, tensors=tensors))
    # values that cannot be importance: NaN, infinite or negative sums and counts
    for name, value in (("blk.0.attn_q.weight.in_sum2", float("nan")), ("blk.0.attn_q.weight.in_sum2", -1.0),
                        ("blk.0.attn_q.weight.counts", float("inf")), ("blk.0.attn_q.weight.counts", -3.0),
                        ("blk.0.attn_q.weight.counts", float("nan"))):
        cases.append(Mutation(f"{name} holds {value}",
                              patches=((seed_file.data_start + infos[name].offset, struct.pack("<f", value)),)))
    return seed, cases


def test_imatrix_reader(imatrix_inputs, tmp_path):
    from grokquant.calibrate.imatrix import load_imatrix

    seed, cases = imatrix_inputs
    fuzz = Fuzz("imatrix", tmp_path, len(cases))
    path = tmp_path / "fuzzed.imatrix"
    path.write_bytes(seed)
    assert fuzz("the seed", lambda: load_imatrix(path), len(seed))
    for case in cases:
        data = case.content(seed)
        path.write_bytes(data)
        fuzz(case.label, lambda: load_imatrix(path), len(data))
    fuzz.check()


# ---- safetensors headers and the checkpoint --------------------------------------------------------

def safetensors_file(header, data: bytes) -> bytes:
    """A safetensors file of `header` (a dict, or JSON text as it is) over `data`."""
    raw = (header if isinstance(header, str) else json.dumps(header, separators=(",", ":"))).encode("utf-8", "surrogatepass")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data


def safetensors_cases(rng: random.Random, seed: bytes, n_cut: int, n_flip: int) -> list[Mutation]:
    """Truncations, bit flips, absurd header lengths, and headers with wrong types and absurd shapes/offsets."""
    (n,) = struct.unpack_from("<Q", seed)
    header = json.loads(seed[8:8 + n])
    data_start = 8 + n
    cases = cuts(rng, seed, data_start, n_cut)
    cases += flips(rng, seed, 8, data_start, n_flip, "header JSON")
    cases += flips(rng, seed, 8, data_start, n_flip // 4, "header JSON", max_bits=6)
    cases += flips(rng, seed, 0, 8, 8, "header length")
    cases += flips(rng, seed, data_start, len(seed), 3, "data")
    cases += [Mutation(f"header length = {v}", patches=((0, struct.pack("<Q", v)),)) for v in U64 + (n - 8, n + 8)]

    def with_header(label, h):
        cases.append(Mutation(label, head=safetensors_file(h, b""), skip=data_start))

    names = [k for k in header if k != "__metadata__"]
    first, last = names[0], names[-1]
    for name in (first, last):
        entry = header[name]
        variants = {"shape": [[2**62], [-1, 4], [2**32, 2**32, 2**32], [1.5, 2], "x", None, [[1]], [],
                              [entry["shape"][0] * 2, *entry["shape"][1:]], list(reversed(entry["shape"]))],
                    "data_offsets": [[0, 2**64], [-1, 10], [5, 3], [0], [0, 1, 2], "a", None, [0.5, 2.5],
                                     [2**63, 2**63 + 2], [0, entry["data_offsets"][1] * 2]],
                    "dtype": ["F8_E4M3", "", "bf16", 5, None, ["BF16"], "I8", "F64", "BOOL", "U8"]}
        for key, values in variants.items():
            for v in values:
                h = json.loads(json.dumps(header))
                h[name][key] = v
                with_header(f"{name} {key} = {v!r}", h)
            h = json.loads(json.dumps(header))
            del h[name][key]
            with_header(f"{name} without {key}", h)
        for v in WRONG:
            h = dict(header, **{name: v})
            with_header(f"{name} entry = {v!r}", h)
    for v in ("x", [1], 5, None, {"format": 5}, {"a": {"b": "c"}}, {"k": "line\nbreak"}):
        with_header(f"__metadata__ = {v!r}", {"__metadata__": v, **header})
    weird = json.loads(json.dumps(header))
    weird["model.layers.0\nnewline.weight"] = weird.pop(first)
    with_header("a tensor name with a newline", weird)
    weird = json.loads(json.dumps(header))
    weird["x" * 5000] = weird.pop(first)
    with_header("a 5000-character tensor name", weird)
    weird = json.loads(json.dumps(header))
    weird["\udcff\u0000"] = weird.pop(first)
    with_header("a tensor name of a lone surrogate and a NUL", weird)
    text = json.dumps(header)
    for label, h in (("a JSON list", "[" + text + "]"), ("a JSON string", '"x"'), ("null", "null"),
                     ("deep brackets", nested(100000)), ("deep objects", '{"a":' * 50000 + "1" + "}" * 50000),
                     ("a number of 100000 digits", '{"a": ' + "9" * 100000 + "}"),
                     ("the first entry twice", text[:-1] + "," + json.dumps({first: header[first]})[1:]),
                     ("not UTF-8", text.replace('"dtype"', '"dty\udcfe"', 1)), ("empty", ""),
                     ("nothing but spaces", " " * 64), ("NaN offsets", text.replace(
                         json.dumps(header[first]["data_offsets"]), "[NaN, Infinity]", 1))):
        with_header(f"header: {label}", h)
    return cases


@pytest.fixture(scope="module")
def checkpoint_copy(tiny_tp8, tmp_path_factory) -> Path:
    """One private copy of the tiny checkpoint; cases damage it in place and put the bytes back."""
    dst = tmp_path_factory.mktemp("fuzz") / "ckpt"
    shutil.copytree(tiny_tp8, dst)
    return dst


@pytest.fixture(scope="module")
def safetensors_inputs(tiny_tp8):
    seeds = {name: (tiny_tp8 / name).read_bytes() for name in (SHARD, COMMON)}
    rng = random.Random(19)
    return seeds, {name: safetensors_cases(rng, seed, n_cut=40, n_flip=50) for name, seed in seeds.items()}


class Restoring:
    """Writes mutations of one file in place and puts the original back afterwards."""

    def __init__(self, path: Path):
        self.path, self.seed = path, path.read_bytes()

    def write(self, data: bytes) -> None:
        self.path.write_bytes(data)

    def restore(self) -> None:
        self.path.write_bytes(self.seed)


def test_safetensors_header_reader(safetensors_inputs, tmp_path):
    seeds, cases = safetensors_inputs
    fuzz = Fuzz("safetensors header", tmp_path, sum(map(len, cases.values())))
    path = tmp_path / "fuzzed.safetensors"

    def read():
        entries, metadata, problems = read_header(path)  # never raises: the problems are the report
        for p in problems:
            if "\n" in p:
                raise GrokquantError(p)  # Fuzz reports it as a message of two lines
        for e in entries:
            if e.end > path.stat().st_size and not problems:
                raise AssertionError(f"{e.name} runs past the end of the file, no problem reported")

    for name, seed in seeds.items():
        for case in cases[name]:
            data = case.content(seed)
            path.write_bytes(data)
            fuzz(f"{name}: {case.label}", read, len(data))
    fuzz.check()


def open_checkpoint(path: Path, shard: str) -> None:
    """Checkpoint.open, then every tensor of `shard` read (TP slices merged) when the checkpoint opens."""
    from grokquant.grok.checkpoint import Checkpoint

    with Checkpoint.open(path) as ckpt:
        names = [n for n, slices in ckpt.entries.items() if any(e.file.name == shard for e in slices.values())]
        total = sum(f.stat().st_size for f in ckpt.files)
        for n in names:
            t = ckpt.tensor(n)  # torch allocations are not traced: check the size instead
            assert t.numel() * t.element_size() <= total


def test_checkpoint_reader(safetensors_inputs, checkpoint_copy):
    seeds, cases = safetensors_inputs
    chosen = {name: cs[::CHECKPOINT_EVERY] for name, cs in cases.items()}
    fuzz = Fuzz("checkpoint", checkpoint_copy, sum(map(len, chosen.values())))
    size = sum(p.stat().st_size for p in checkpoint_copy.iterdir())
    assert fuzz("the seed", lambda: open_checkpoint(checkpoint_copy, SHARD), size)
    for name, seed in seeds.items():
        shard = Restoring(checkpoint_copy / name)
        for case in chosen[name]:
            shard.write(case.content(seed))
            try:
                fuzz(f"{name}: {case.label}", lambda: open_checkpoint(checkpoint_copy, name), size)
            finally:
                shard.restore()
    fuzz.check()


def json_cases(rng: random.Random, raw: dict, keys, n_cut: int, n_flip: int, what: str, palette=WRONG,
               per_key: int | None = None) -> list[Mutation]:
    """Each of `keys` given wrong values (a sample of `per_key` of them), left out; the text cut and flipped;
    whole documents of the wrong kind."""
    text = json.dumps(raw, indent=2).encode()
    cases = text_cases(rng, text, n_cut, n_flip, what)
    for key in keys:
        values = palette if per_key is None else rng.sample(palette, per_key)
        for v in values:
            cases.append(whole(f"{key} = {v!r}", json.dumps({**raw, key: v}).encode("utf-8", "surrogatepass")))
        if key in raw:
            cases.append(whole(f"without {key}", json.dumps({k: v for k, v in raw.items() if k != key}).encode()))
    for label, doc in (("a list", b"[1, 2]"), ("a string", b'"config"'), ("null", b"null"), ("empty", b""),
                       ("deep brackets", nested(100000).encode()), ("not UTF-8", b'{"a": "\xff\xfe"}'),
                       ("a UTF-16 BOM", b"\xff\xfe{\x00}\x00"), ("a number of 100000 digits", b"9" * 100000),
                       ("binary", bytes(range(256)))):
        cases.append(whole(f"{what}: {label}", doc))
    return cases


@pytest.fixture(scope="module")
def config_inputs(tiny_tp8):
    raw = json.loads((tiny_tp8 / "config.json").read_text())
    rng = random.Random(20)
    palette = WRONG + (2**31, 10**9, 10**6, 3)
    cases = json_cases(rng, raw, list(raw), n_cut=30, n_flip=40, what="config.json", palette=palette, per_key=7)
    # sizes that are each plausible but together absurd: the checkpoint's inventory would have billions of names
    for values in ({"num_hidden_layers": 10**9}, {"num_local_experts": 10**8, "num_experts_per_tok": 2},
                   {"num_hidden_layers": 100000, "num_local_experts": 100000}, {"vocab_size": 2**62},
                   {"hidden_size": 2**40, "head_dim": 2**38}, {"num_attention_heads": 2**31, "num_key_value_heads": 1},
                   {"max_position_embeddings": 2**40}, {"rope_theta": 1e300}):
        cases.append(whole(f"config.json {values}", json.dumps({**raw, **values}).encode()))
    return raw, cases


def test_config_reader(config_inputs, checkpoint_copy):
    from grokquant.grok.config import GrokConfig

    raw, cases = config_inputs
    fuzz = Fuzz("config.json", checkpoint_copy, len(cases))
    config = Restoring(checkpoint_copy / "config.json")
    size = sum(p.stat().st_size for p in checkpoint_copy.iterdir())
    for case in cases:
        data = case.content(config.seed)
        config.write(data)
        try:
            if fuzz(case.label, lambda: GrokConfig.from_file(config.path), len(data)):
                # a config.json that reads: the checkpoint's inventory is built from it
                fuzz(f"{case.label}: Checkpoint.open", lambda: open_checkpoint(checkpoint_copy, COMMON), size)
        finally:
            config.restore()
    fuzz.check()


@pytest.fixture(scope="module")
def tokenizer_inputs(tiny_tp8):
    raw = json.loads((tiny_tp8 / "tokenizer.tok.json").read_text())
    rng = random.Random(21)
    cases = json_cases(rng, raw, list(raw), n_cut=25, n_flip=35, what="tok.json", per_key=8)
    regular, special = raw["regular_tokens"], raw["special_tokens"]
    for where, tokens in (("regular_tokens", regular), ("special_tokens", special)):
        for i in sorted({0, len(tokens) - 1, rng.randrange(len(tokens))}):
            for v in WRONG + ({"bytes": [65]}, {"token": 5}):
                bad = list(tokens)
                bad[i] = v
                cases.append(whole(f"{where}[{i}] = {v!r}", json.dumps({**raw, where: bad}).encode("utf-8", "surrogatepass")))
            for key, values in (("bytes", [2**62, 2**31, 10**9, -1, [256], [-1], [1.5], "ab", None, {}, [2**64],
                                           [0xFF, 0xFE], list(range(256)) * 40]),
                                ("token", [-1, 2**62, 2**64, 2**32, "5", 1.5, True, None, [1],
                                           tokens[i - 1]["token"], 10**6])):
                for v in values:
                    bad = list(tokens)
                    bad[i] = {**tokens[i], key: v}
                    cases.append(whole(f"{where}[{i}].{key} = {v!r:.40}", json.dumps({**raw, where: bad}).encode()))
    for v in ("(", "[a-", "(?<x>", "\\", "(?P<n>a)(?P<n>b)", "a{99999999999}"):
        cases.append(whole(f"pat_str = {v!r}", json.dumps({**raw, "pat_str": v}).encode()))
    cases.append(whole("a regular token twice", json.dumps({**raw, "regular_tokens": regular + regular[-1:]}).encode()))
    cases.append(whole("a byte missing", json.dumps({**raw, "regular_tokens": regular[1:]}).encode()))
    cases.append(whole("100000 special tokens", json.dumps(
        {**raw, "special_tokens": [{"bytes": [65, i % 256, i // 256], "token": 10**6 + i} for i in range(100000)]}).encode()))
    return raw, cases


def test_tokenizer_reader(tokenizer_inputs, tmp_path):
    from grokquant.grok.tokenizer import load_tokenizer

    raw, cases = tokenizer_inputs
    fuzz = Fuzz("tokenizer", tmp_path, len(cases))
    seed = json.dumps(raw, indent=2).encode()
    path = tmp_path / "tokenizer.tok.json"
    for case in cases:
        data = case.content(seed)
        path.write_bytes(data)
        fuzz(case.label, lambda: load_tokenizer(path).encode("fuzzed <|eos|> tokenizer"), len(data))
    fuzz.check()


# ---- GPTQ artifact directories -------------------------------------------------------------------------

GPTQ_SHARD = "model-00002-of-00003.safetensors"


@pytest.fixture(scope="module")
def gptq_artifact(tiny_tp8, tmp_path_factory) -> Path:
    from grokquant.data.documents import calibration_tokens
    from grokquant.grok.tokenizer import load_tokenizer
    from grokquant.quantize.recipe import load_recipe
    from grokquant.quantize.run import quantize

    tokens = calibration_tokens(load_tokenizer(tiny_tp8 / "tokenizer.tok.json"), "builtin", 128, 64, seed=1)
    out = tmp_path_factory.mktemp("fuzz") / "gptq"
    return quantize(tiny_tp8, out, replace(load_recipe("gptq-w4g128-experts-w8-attn"), method="rtn"), tokens)


@pytest.fixture(scope="module")
def gptq_inputs(gptq_artifact):
    rng = random.Random(22)
    cases: list[tuple[str, Mutation]] = []
    config = json.loads((gptq_artifact / "config.json").read_text())
    quant = config["quantization_config"]
    palette = WRONG + (2, 3, 8, 16, 32, -2)
    for key in list(quant) + ["dynamic"]:
        for v in rng.sample(palette, 9):
            doc = {**config, "quantization_config": {**quant, key: v}}
            cases.append(("config.json", whole(f"quantization_config.{key} = {v!r}",
                                               json.dumps(doc).encode("utf-8", "surrogatepass"))))
    for dynamic in ({"(": {}}, {"+:(": {"bits": 8}}, {"+:.*": []}, {"+:.*": {"bits": "8"}}, {"+:.*": {"bits": 3}},
                    {"+:.*": {"group_size": 0}}, {"+:.*": {"sym": None}}, {"-:.*": {}}, {"+:(a+)+$": {}},
                    {"+:.*self_attn.*": {"bits": 2, "group_size": 7}}, {"+:.*": {"group_size": 2**62}}):
        doc = {**config, "quantization_config": {**quant, "dynamic": dynamic}}
        cases.append(("config.json", whole(f"dynamic = {dynamic!r}", json.dumps(doc).encode())))
    for v in WRONG[:12]:
        cases.append(("config.json", whole(f"quantization_config = {v!r}",
                                           json.dumps({**config, "quantization_config": v}).encode())))
    model_keys = [k for k in config if k != "quantization_config"]
    cases += [("config.json", c) for c in json_cases(rng, config, rng.sample(model_keys, 8), n_cut=15, n_flip=20,
                                                     what="config.json", per_key=5)]
    qc = json.loads((gptq_artifact / "quantize_config.json").read_text())
    cases += [("quantize_config.json", c) for c in json_cases(rng, qc, list(qc), n_cut=10, n_flip=10,
                                                              what="quantize_config.json", per_key=5)]
    index = json.loads((gptq_artifact / "model.safetensors.index.json").read_text())
    some = next(iter(index["weight_map"]))
    for v in ({some: "../config.json"}, {some: "/etc/passwd"}, {some: 5}, {some: None}, {"x": GPTQ_SHARD},
              {some: "missing.safetensors"}, [], "x", None, {some: "model-00002-of-00003.safetensors\n"}):
        cases.append(("model.safetensors.index.json", whole(f"weight_map = {v!r:.50}", json.dumps(
            {**index, "weight_map": {**index["weight_map"], **v} if isinstance(v, dict) else v}).encode())))
    cases += [("model.safetensors.index.json", c) for c in text_cases(rng, json.dumps(index).encode(), 8, 8, "index")]
    shard = (gptq_artifact / GPTQ_SHARD).read_bytes()
    cases += [(GPTQ_SHARD, c) for c in safetensors_cases(rng, shard, n_cut=15, n_flip=20)[::2]]
    return cases


def open_gptq(path: Path) -> None:
    """GPTQWeights, then a quantized and a plain tensor of the damaged shard read (dequantized)."""
    from grokquant.gptq.weights import GPTQWeights

    with GPTQWeights(path) as w:
        names = w.names()
        in_shard = [n for n in names if w.where.get(n, w.where.get(n[: -len(".weight")] + ".qweight")) == GPTQ_SHARD]
        quantized = [n for n in in_shard if w.is_quantized(n)][:2]
        plain = [n for n in in_shard if not w.is_quantized(n)][:1]
        for n in quantized + plain:
            w.tensor(n)


def test_gptq_reader(gptq_artifact, gptq_inputs, tmp_path):
    copy = tmp_path / "artifact"
    shutil.copytree(gptq_artifact, copy)
    files = {name: Restoring(copy / name) for name in {f for f, _ in gptq_inputs}}
    fuzz = Fuzz("gptq", copy, len(gptq_inputs))
    size = sum(p.stat().st_size for p in copy.iterdir())
    assert fuzz("the seed", lambda: open_gptq(copy), size)
    for name, case in gptq_inputs:
        f = files[name]
        f.write(case.content(f.seed))
        try:
            fuzz(f"{name}: {case.label}", lambda: open_gptq(copy), size)
        finally:
            f.restore()
    fuzz.check()


# ---- recipes -----------------------------------------------------------------------------------------

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
# nine levels of nine aliases: 9^9 values once expanded, anchored inside `description` (a key recipes allow)
BILLION_LAUGHS = "description: [&a [x, x, x, x, x, x, x, x, x], " + ", ".join(
    f"&{chr(98 + i)} [" + ", ".join([f"*{chr(97 + i)}"] * 9) + "]" for i in range(8)) + "]"


@pytest.fixture(scope="module")
def recipe_inputs():
    rng = random.Random(23)
    seeds = sorted(RECIPES.glob("*.yaml"))
    cases: list[tuple[str, Mutation]] = []
    palette = [None, True, 0, -1, 2**62, 10**400, 1.5, ".nan", ".inf", "-.inf", "", "x", "'4'", "[1, 2]", "{}",
               "{bits: {a: 1}}", "!!binary ZZZ", "2001-13-45", "!!python/object:os.system ls", "*undefined",
               "[" * 200 + "]" * 200, "0x" + "f" * 40, "1" * 5000, "? [a, b]"]
    for path in seeds:
        text = path.read_bytes()
        cases += [(path.name, c) for c in text_cases(rng, text, 2, 3, path.name, first=0)]
        raw = yaml.safe_load(text)
        keys = list(raw) + [k for k in ("overrides", "target_bpw", "damp", "refits", "experts") if k not in raw]
        for key in rng.sample(keys, min(3, len(keys))):
            for v in rng.sample(palette, 2):
                doc = {k: val for k, val in raw.items() if k != key}
                body = yaml.safe_dump(doc, sort_keys=False) + f"{key}: {v}\n"
                cases.append((path.name, whole(f"{key}: {v!s:.40}", body.encode())))
        for cls in ("experts", "attention", "overrides"):
            if isinstance(raw.get(cls), dict):
                for k in list(raw[cls])[:2] + ["unknown"]:
                    for v in rng.sample(palette, 2):
                        body = yaml.safe_dump({**raw, cls: {kk: vv for kk, vv in raw[cls].items() if kk != k}},
                                              sort_keys=False, default_flow_style=False)
                        body = body.replace(f"{cls}:\n", f"{cls}:\n  {k}: {v}\n", 1)
                        cases.append((path.name, whole(f"{cls}.{k}: {v!s:.40}", body.encode())))
    for label, text in (("billion laughs in overrides", BILLION_LAUGHS + "\nformat: gguf\nftype: q8_0\noverrides: {attention: *i}"),
                        ("billion laughs as the name", BILLION_LAUGHS + "\nformat: gguf\nftype: q8_0\nname: *i"),
                        ("billion laughs as the ftype", BILLION_LAUGHS + "\nformat: gguf\nftype: *i"),
                        ("billion laughs as bits", BILLION_LAUGHS + "\nformat: gptq\nexperts: {bits: *i}"),
                        ("deep brackets", nested(100000)), ("deep mappings", "a: {" * 20000 + "}" * 20000),
                        ("not UTF-8", "name: \xff\xfe\nftype: q8_0"), ("a tab", "name:\tx\n\tftype: q8_0"),
                        ("a list", "- q8_0"), ("empty", ""), ("a number", "5"), ("null", "~"),
                        ("binary", "".join(map(chr, range(256)))), ("a NUL byte", "ftype: q8_0\x00"),
                        ("duplicate keys", "ftype: q8_0\nftype: q4_k_m"), ("two documents", "ftype: q8_0\n---\nftype: x"),
                        ("overrides with a list key", "ftype: q8_0\noverrides: {? [a, b] : Q8_0}"),
                        ("override key a number", "ftype: q8_0\noverrides: {7: Q8_0}"),
                        ("override value a mapping", "ftype: q8_0\noverrides: {attention: {x: Q8_0}}"),
                        ("override value a long list", "ftype: q8_0\noverrides: {attention: [" + "Q8_0, " * 5000 + "]}"),
                        ("a 100 kB recipe", "ftype: q8_0\n" + "# padding\n" * 10000),
                        ("gguf damp NaN", "ftype: q4_k_m\nmethod: gptq\ndamp: .nan"),
                        ("gguf damp negative", "ftype: q4_k_m\nmethod: gptq\ndamp: -3"),
                        ("gguf damp huge", "ftype: q4_k_m\nmethod: gptq\ndamp: 1e300"),
                        ("gptq damp NaN", "format: gptq\nexperts: {damp: .nan}"),
                        ("gptq block_size huge", "format: gptq\nexperts: {block_size: 99999999999999999999}"),
                        ("gptq group_size huge", "format: gptq\nexperts: {group_size: 18446744073709551617}"),
                        ("min_tokens huge", "ftype: q8_0\nmin_tokens: 18446744073709551617"),
                        ("min_tokens NaN", "ftype: q8_0\nmin_tokens: .nan"),
                        ("target_bpw NaN", "ftype: q4_k_m\nmethod: imatrix\ntarget_bpw: .nan"),
                        ("a python tag", "!!python/object/apply:os.system [ls]")):
        cases.append(("q8_0.yaml", whole(label, text.encode("utf-8", "surrogateescape"))))
    return cases


def test_recipe_reader(recipe_inputs, tmp_path):
    from grokquant.quantize.recipe import load_recipe

    fuzz = Fuzz("recipe", tmp_path, len(recipe_inputs))
    seeds = {p.name: p.read_bytes() for p in RECIPES.glob("*.yaml")}
    for name, case in recipe_inputs:
        data = case.content(seeds[name])
        path = tmp_path / name
        path.write_bytes(data)
        fuzz(f"{name}: {case.label}", lambda: load_recipe(path), len(data))
        path.unlink()  # the next case may use another name: the folder must look the same each time
    fuzz.check()


# ---- calibration text --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def document_inputs():
    from grokquant.data.corpus import split_documents

    docs = split_documents("train")[:6]
    text = "\n\n".join(docs)[:6000].encode()
    rows = [{"text": docs[0][:400]}, {"prompt": "What is 2+2?", "response": "4."}, {"text": "ünïcödé ✓ 🙂 line\u2028separator"},
            {"prompt": docs[1][:200], "response": docs[2][:200]}]
    jsonl = "\n".join(json.dumps(r, ensure_ascii=False) for r in rows).encode() + b"\n"
    rng = random.Random(24)
    cases = [("doc.txt", c) for c in text_cases(rng, text, 20, 25, "text")]
    cases += [("doc.txt", whole(label, data)) for label, data in (
        ("not UTF-8", b"caf\xe9 " * 50), ("binary", bytes(range(256)) * 4), ("UTF-16", "text".encode("utf-16")),
        ("empty", b""), ("a lone surrogate", b"\xed\xa0\x80 text"), ("NUL bytes", b"\0" * 4096))]
    cases += [("rows.jsonl", c) for c in text_cases(rng, jsonl, 25, 35, "jsonl")]
    for v in WRONG + ({"text": "x"}, ["text"]):
        for field in ("text", "prompt", "response"):
            row = {"text": v} if field == "text" else {"prompt": "p", "response": "r", field: v}
            cases.append(("rows.jsonl", whole(f"{field} = {v!r}", jsonl + json.dumps(row).encode("utf-8", "surrogatepass") + b"\n")))
    for label, line in (("a list row", b"[1, 2]"), ("a string row", b'"text"'), ("null row", b"null"),
                        ("deep brackets", nested(100000).encode()), ("a number of 100000 digits", b"9" * 100000),
                        ("not UTF-8", b'{"text": "caf\xe9"}'), ("NaN", b'{"text": NaN}'),
                        ("an escaped lone surrogate", b'{"text": "\\ud800"}'), ("CR line ends", b'{"text": "a"}\r\r\r'),
                        ("a form feed inside", b'{"text": "a\x0cb"}'), ("a NUL inside", b'{"text": "a\x00b"}')):
        cases.append(("rows.jsonl", whole(label, jsonl + line + b"\n")))
    folder = [("doc.txt", c) for c in rng.sample([c for _, c in cases[:60]], 10)]
    cases += [("folder/" + name, c) for name, c in folder]
    return {"doc.txt": text, "rows.jsonl": jsonl}, cases


def test_calibration_text_reader(tiny_tp8, document_inputs, tmp_path):
    from grokquant.data.documents import calibration_tokens, load_documents
    from grokquant.grok.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny_tp8 / "tokenizer.tok.json")
    seeds, cases = document_inputs
    fuzz = Fuzz("calibration text", tmp_path, len(cases))
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "rows.jsonl").write_bytes(seeds["rows.jsonl"])
    (tmp_path / "folder" / "notes.md").write_text("a second document " * 30)

    def read(path, chat):
        load_documents(path, chat)
        calibration_tokens(tok, path, 64, 16, seed=3, chat=chat)

    for name, seed in seeds.items():  # the seeds read (U+2028 inside a JSON string does not end its line)
        (tmp_path / name).write_bytes(seed)
        assert fuzz(f"the seed {name}", lambda: read(tmp_path / name, chat=True), len(seed)), fuzz.failures
        (tmp_path / name).unlink()
    for i, (name, case) in enumerate(cases):
        data = case.content(seeds[Path(name).name])
        path = tmp_path / name
        path.write_bytes(data)
        where = path.parent if name.startswith("folder/") else path
        fuzz(f"{name}: {case.label}", lambda: read(where, chat=i % 2 == 1), len(data))
        if not name.startswith("folder/"):
            path.unlink()
    fuzz.check()


# ---- how many inputs each reader was given -------------------------------------------------------------

def test_fuzzed_input_counts(gguf_inputs, imatrix_inputs, safetensors_inputs, config_inputs, tokenizer_inputs,
                             gptq_inputs, recipe_inputs, document_inputs):
    counts = {"gguf": len(gguf_inputs[1]), "imatrix": len(imatrix_inputs[1]),
              "safetensors header": sum(map(len, safetensors_inputs[1].values())),
              "checkpoint": sum(len(cs[::CHECKPOINT_EVERY]) for cs in safetensors_inputs[1].values()),
              "config.json": len(config_inputs[1]), "tokenizer": len(tokenizer_inputs[1]),
              "gptq": len(gptq_inputs), "recipe": len(recipe_inputs), "calibration text": len(document_inputs[1])}
    for reader, n in COUNTS.items():  # the readers' tests ran: the same numbers (plus config.json's opens)
        assert counts[reader] == n, reader
    print("\nfuzzed inputs per reader: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    assert all(n >= 100 for n in counts.values()), counts


# ---- through the CLI: exit 2, one line, nothing written ---------------------------------------------------

def cli(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "grokquant", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=120)


def assert_refused(proc, *folders: Path) -> None:
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: "), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    for folder in folders:
        assert sorted(os.listdir(folder)) == [], os.listdir(folder)  # hidden temporaries included


def test_cli_refuses_a_bad_gguf(gguf_seed, tmp_path):
    seed_file = gguf.read_gguf(gguf_seed)
    _, kvs, _ = gguf_layout(gguf_seed.read_bytes())
    bad = gguf_rebuilt(seed_file, kvs, "block count", {"grok.block_count": (gguf.STRING, "2", None)})
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir(), out.mkdir()
    path = inputs / "bad.gguf"
    path.write_bytes(bad.content(gguf_seed.read_bytes()))
    assert_refused(cli("eval", path, "--chunks", 1, "--ctx", 32, cwd=out), out)
    assert os.listdir(inputs) == ["bad.gguf"]


def test_cli_refuses_a_bad_checkpoint(checkpoint_copy, tmp_path):
    shard = Restoring(checkpoint_copy / SHARD)
    seed = shard.seed
    (n,) = struct.unpack_from("<Q", seed)
    header = json.loads(seed[8:8 + n])
    first = next(k for k in header if k != "__metadata__")
    header[first]["shape"] = [2**62, 1]
    shard.write(safetensors_file(header, seed[8 + n:]))
    try:
        assert_refused(cli("convert", checkpoint_copy, "-o", tmp_path / "out.gguf", "--type", "q8_0"), tmp_path)
    finally:
        shard.restore()


def test_cli_refuses_a_bad_imatrix(tiny_tp8, imatrix_inputs, tmp_path):
    seed, _ = imatrix_inputs
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir(), out.mkdir()
    bad = inputs / "bad.imatrix"
    bad.write_bytes(seed[:len(seed) // 2])
    assert_refused(cli("convert", tiny_tp8, "-o", out / "out.gguf", "--type", "q4_k_m", "--imatrix", bad), out)


def test_cli_refuses_a_bad_recipe(tiny_tp8, tmp_path):
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir(), out.mkdir()
    bad = inputs / "bad.yaml"
    bad.write_text(BILLION_LAUGHS + "\nformat: gguf\nftype: q4_k_m\nmethod: gptq\noverrides: {attention: *i}\n")
    assert_refused(cli("quantize", tiny_tp8, "-o", out / "q.gguf", "--recipe", bad, "--tokens", 64, "--seq-len", 32), out)


def test_cli_refuses_bad_calibration_text(tiny_tp8, tmp_path):
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir(), out.mkdir()
    bad = inputs / "bad.jsonl"
    bad.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    assert_refused(cli("calibrate", tiny_tp8, "-o", out / "stats.safetensors", "--data", bad, "--tokens", 64,
                       "--seq-len", 32, "--imatrix", out / "x.imatrix"), out)


def test_cli_refuses_a_bad_gptq_artifact(gptq_artifact, tmp_path):
    copy = tmp_path / "artifact"
    shutil.copytree(gptq_artifact, copy)
    config = json.loads((copy / "config.json").read_text())
    config["quantization_config"]["dynamic"] = {"+:(": {"bits": 8}}
    (copy / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    out.mkdir()
    before = listing(copy)
    assert_refused(cli("eval", copy, "--chunks", 1, "--ctx", 32, cwd=out), out)
    assert listing(copy) == before
