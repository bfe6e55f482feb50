"""Read the Grok 2 release as shipped: discovery, inventory, validation and lazy tensor access.

Two layouts are accepted:
- `tp8`: the original `<prefix>-NNNNN-TP-common.safetensors` files with full tensors, and
  `<prefix>-NNNNN-TP-000..007.safetensors` files holding the 8 tensor-parallel slices of every
  expert matrix under the *same* name. Entries are keyed by (name, rank) so slices never collide.
- `merged`: one full tensor per name in any `*.safetensors` files (index JSON optional).

Nothing is loaded at open time: only headers are parsed. Tensors are copied out of memory-mapped
files on request, merging TP slices in rank order (dim 0 for w1/w3, dim 1 for w2).
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from grokquant.grok.config import EXPERT_MERGE_DIM, TP_RANKS, GrokConfig, expert_name, parse_expert_name
from grokquant.errors import CheckpointError
from grokquant.io.safetensors_file import DTYPES, MappedFiles, TensorEntry, read_header

TP_FILE = re.compile(r"^(?P<prefix>.+)-(?P<num>\d{5})-TP-(?P<rank>common|\d{3})\.safetensors$")
TOKENIZER_FILE = "tokenizer.tok.json"
INDEX_FILE = "model.safetensors.index.json"
MERGED_DTYPES = {"BF16", "F16", "F32"}
MAX_LISTED = 3  # names quoted per problem line; the count says the rest


@dataclass
class Checkpoint:
    """A validated view of a checkpoint directory. Use `Checkpoint.open` or `scan`."""

    path: Path
    layout: str  # "tp8" or "merged"
    config: GrokConfig | None
    files: list[Path]
    entries: dict[str, dict[int | None, TensorEntry]]  # name -> rank (None = full tensor) -> entry
    problems: list[str] = field(default_factory=list)
    tokenizer_path: Path | None = None
    _files: MappedFiles = field(default_factory=MappedFiles, repr=False)

    # ---- opening ---------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path) -> "Checkpoint":
        """Scan and validate; raise CheckpointError (one line) if anything is wrong."""
        ckpt = scan(path)
        if ckpt.problems:
            raise CheckpointError(ckpt.error_line())
        return ckpt

    def error_line(self) -> str:
        first = self.problems[0]
        more = len(self.problems) - 1
        return f"{self.path}: {first}" + (f" (and {more} more problem{'s' * (more > 1)}; "
                                          f"run `grokquant inspect` for all)" if more else "")

    def identity(self) -> str:
        """What a resumed job compares to know it reads the same checkpoint: the config and each weight
        file's name, size and modification time (hashing 539 GB would take an hour)."""
        stats = [f"{f.name}:{st.st_size}:{st.st_mtime_ns}" for f, st in ((f, f.stat()) for f in self.files)]
        return json.dumps([asdict(self.config) if self.config else None, stats], sort_keys=True)

    def close(self) -> None:
        self._files.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- inventory ---------------------------------------------------------------------------
    def names(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        slices = self._slices(name)
        if None in slices:
            return slices[None].shape
        dim = EXPERT_MERGE_DIM[parse_expert_name(name)[2]]
        shape = list(slices[0].shape)
        shape[dim] = sum(slices[r].shape[dim] for r in range(TP_RANKS))
        return tuple(shape)

    def dtype(self, name: str) -> torch.dtype:
        return DTYPES[next(iter(self._slices(name).values())).dtype][0]

    def _slices(self, name: str) -> dict[int | None, TensorEntry]:
        try:
            return self.entries[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: no tensor named {name}") from None

    # ---- tensor access ---------------------------------------------------------------------------
    def tensor(self, name: str) -> torch.Tensor:
        """The full tensor (TP slices merged), copied out of the mapped files."""
        slices = self._slices(name)
        if None in slices:
            return self._files.read(slices[None])
        dim = EXPERT_MERGE_DIM[parse_expert_name(name)[2]]
        out = torch.empty(self.shape(name), dtype=self.dtype(name))
        offset = 0
        for rank in range(TP_RANKS):
            entry = slices[rank]
            width = entry.shape[dim]
            self._files.read_into(entry, out.narrow(dim, offset, width))
            offset += width
        return out

    def tensor_slice(self, name: str, rank: int) -> torch.Tensor:
        """One TP slice of an expert matrix as stored (rank 0..7); for shard-wise processing."""
        return self._files.read(self._slices(name)[rank])

    def expert(self, layer: int, expert: int, proj: str) -> torch.Tensor:
        return self.tensor(expert_name(layer, expert, proj))

    def experts(self, layer: int, proj: str) -> torch.Tensor:
        """All experts of one projection stacked: [n_experts, out, in]."""
        n = self.config.num_local_experts
        first = self.expert(layer, 0, proj)
        out = torch.empty((n, *first.shape), dtype=first.dtype)
        out[0] = first
        del first
        for e in range(1, n):
            out[e] = self.expert(layer, e, proj)
        return out

    def layer_names(self, layer: int) -> list[str]:
        return list(self.config.layer_shapes(layer))

    def layer_tensors(self, layer: int) -> dict[str, torch.Tensor]:
        return {name: self.tensor(name) for name in self.layer_names(layer)}

    def iter_layers(self) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        """Yield (layer, tensors) one decoder layer at a time; drop each before taking the next."""
        for layer in range(self.config.num_hidden_layers):
            yield layer, self.layer_tensors(layer)


# ---- scanning and validation ---------------------------------------------------------------------

def scan(path: str | Path) -> Checkpoint:
    """Read every header and collect all problems (without raising on bad data)."""
    root = Path(path)
    if not root.is_dir():
        raise CheckpointError(f"{root}: not a directory")
    problems: list[str] = []

    config = None
    try:
        config = GrokConfig.from_file(root / "config.json")
    except CheckpointError as exc:
        problems.append(str(exc).replace(str(root) + "/", ""))

    tp_files = sorted(p for p in root.glob("*.safetensors") if TP_FILE.match(p.name))
    other_files = sorted(p for p in root.glob("*.safetensors") if not TP_FILE.match(p.name))
    if tp_files:
        layout = "tp8"
        files = tp_files
        if other_files:
            problems.append(f"mixed layouts: TP shards next to {other_files[0].name}")
    else:
        layout = "merged"
        files = other_files
        problems += _check_index(root, files)
    if not files:
        raise CheckpointError(f"{root}: no *.safetensors files found")

    entries: dict[str, dict[int | None, TensorEntry]] = defaultdict(dict)
    for file in files:
        file_entries, _, file_problems = read_header(file)
        problems += file_problems
        rank = _rank_of(file) if layout == "tp8" else None
        for entry in file_entries:
            where = entries[entry.name]
            if rank in where:
                problems.append(f"{entry.name} stored twice ({where[rank].file.name} and {file.name})")
                continue
            where[rank] = entry

    ckpt = Checkpoint(root, layout, config, files, dict(entries), problems)
    if layout == "tp8":
        problems += _check_rank_files(tp_files)
    if config is not None:
        problems += _check_inventory(ckpt, config, skip_ranks=any("missing rank file" in p for p in problems))
    ckpt.tokenizer_path, tok_problems = _check_tokenizer(root, config)
    problems += tok_problems
    return ckpt


def _rank_of(file: Path) -> int | None:
    rank = TP_FILE.match(file.name)["rank"]
    return None if rank == "common" else int(rank)


def _check_index(root: Path, files: list[Path]) -> list[str]:
    index = root / INDEX_FILE
    if not index.exists():
        return []
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        listed = set(weight_map.values())
    except (ValueError, RecursionError, KeyError, TypeError, AttributeError):  # ValueError: bad JSON or UTF-8
        return [f"{INDEX_FILE}: not a valid index (no weight_map)"]
    present = {f.name for f in files}
    return [f"{INDEX_FILE} lists {name}, which is missing" for name in sorted(listed - present)]


def _check_rank_files(tp_files: list[Path]) -> list[str]:
    problems = []
    prefixes = {TP_FILE.match(f.name)["prefix"] for f in tp_files}
    if len(prefixes) > 1:
        problems.append(f"TP shards with different prefixes: {', '.join(sorted(prefixes))}")
    by_number: dict[tuple[str, str], set[int]] = defaultdict(set)
    for f in tp_files:
        m = TP_FILE.match(f.name)
        if m["rank"] != "common":
            by_number[(m["prefix"], m["num"])].add(int(m["rank"]))
    for (prefix, num), ranks in sorted(by_number.items()):
        for rank in range(TP_RANKS):
            if rank not in ranks:
                problems.append(f"missing rank file {prefix}-{num}-TP-{rank:03d}.safetensors")
        for rank in sorted(ranks - set(range(TP_RANKS))):
            problems.append(f"unexpected rank file {prefix}-{num}-TP-{rank:03d}.safetensors "
                            f"(the release has {TP_RANKS} ranks)")
    return problems


def _listed(names: list[str]) -> str:
    shown = ", ".join(names[:MAX_LISTED])
    return shown + (f" and {len(names) - MAX_LISTED} more" if len(names) > MAX_LISTED else "")


def _check_inventory(ckpt: Checkpoint, config: GrokConfig, skip_ranks: bool) -> list[str]:
    problems = []
    expected = config.all_shapes()
    missing = [n for n in expected if n not in ckpt.entries]
    if missing:
        problems.append(f"missing {len(missing)} tensor(s): {_listed(missing)}")
    extra = [n for n in ckpt.entries if n not in expected]
    if extra:
        where = next(iter(ckpt.entries[extra[0]].values())).file.name
        problems.append(f"{len(extra)} unexpected tensor(s) for this config.json: {_listed(extra)} (in {where})")

    allowed = {"BF16"} if ckpt.layout == "tp8" else MERGED_DTYPES
    for name, slices in ckpt.entries.items():
        if name not in expected:
            continue
        full = expected[name]
        for rank, entry in slices.items():
            if entry.dtype not in allowed:
                problems.append(f"{entry.file.name}: {name} is {entry.dtype}, expected {'/'.join(sorted(allowed))}")
        parsed = parse_expert_name(name)
        if ckpt.layout == "merged" or parsed is None:
            if None not in slices:
                first = next(iter(slices.values()))
                problems.append(f"{first.file.name}: {name} belongs in a TP-common file, found in a rank file")
                continue
            entry = slices[None]
            if entry.shape != full:
                problems.append(f"{entry.file.name}: {name} has shape {list(entry.shape)}, expected {list(full)}")
            continue
        # an expert matrix in the TP layout: exactly ranks 0..7, each one slice wide
        if None in slices:
            problems.append(f"{slices[None].file.name}: expert {name} in a TP-common file; "
                            f"expected {TP_RANKS} rank slices")
            continue
        ranks = set(slices)
        if ranks != set(range(TP_RANKS)) and not skip_ranks:
            lacking = sorted(set(range(TP_RANKS)) - ranks)
            problems.append(f"{name}: slices for rank(s) {lacking} missing")
        dim = EXPERT_MERGE_DIM[parsed[2]]
        want = list(full)
        want[dim] //= TP_RANKS
        for rank, entry in sorted(slices.items()):
            if list(entry.shape) != want:
                problems.append(f"{entry.file.name}: {name} slice has shape {list(entry.shape)}, "
                                f"expected {want} (1/{TP_RANKS} of {list(full)} along dim {dim})")
    return problems


def _check_tokenizer(root: Path, config: GrokConfig | None) -> tuple[Path | None, list[str]]:
    from grokquant.grok.tokenizer import load_tokenizer  # tokenizer does not import checkpoint

    path = root / TOKENIZER_FILE
    if not path.exists():
        return None, [f"{TOKENIZER_FILE} not found"]
    try:
        tok = load_tokenizer(path)
    except CheckpointError as exc:
        return None, [str(exc).replace(str(root) + "/", "")]
    if config is not None and tok.n_vocab > config.vocab_size:
        return path, [f"{TOKENIZER_FILE}: {tok.n_vocab} token ids exceed vocab_size {config.vocab_size}"]
    return path, []

