"""GGML tensor types stored in GGUF files: id, block size, bytes per block (ggml-common.h)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GGMLType:
    name: str
    id: int
    block: int  # elements per block
    block_bytes: int

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.block_bytes / self.block

    def row_bytes(self, n: int) -> int:
        if n % self.block:
            raise ValueError(f"{self.name}: row length {n} is not a multiple of {self.block}")
        return n // self.block * self.block_bytes

    def nbytes(self, shape: tuple[int, ...]) -> int:
        """Bytes of a tensor in torch order (last dim = row)."""
        rows = 1
        for d in shape[:-1]:
            rows *= d
        return rows * self.row_bytes(shape[-1])


TYPES = {t.name: t for t in [
    GGMLType("F32", 0, 1, 4), GGMLType("F16", 1, 1, 2), GGMLType("Q4_0", 2, 32, 18), GGMLType("Q4_1", 3, 32, 20),
    GGMLType("Q5_0", 6, 32, 22), GGMLType("Q5_1", 7, 32, 24), GGMLType("Q8_0", 8, 32, 34),
    GGMLType("Q2_K", 10, 256, 84), GGMLType("Q3_K", 11, 256, 110), GGMLType("Q4_K", 12, 256, 144),
    GGMLType("Q5_K", 13, 256, 176), GGMLType("Q6_K", 14, 256, 210), GGMLType("IQ4_NL", 20, 32, 18),
    GGMLType("IQ4_XS", 23, 256, 136), GGMLType("BF16", 30, 1, 2),
    GGMLType("IQ2_XXS", 16, 256, 66), GGMLType("IQ2_XS", 17, 256, 74), GGMLType("IQ2_S", 22, 256, 82),
    GGMLType("IQ3_XXS", 18, 256, 98), GGMLType("IQ3_S", 21, 256, 110), GGMLType("IQ1_S", 19, 256, 50),
    GGMLType("IQ1_M", 29, 256, 56),
]}
BY_ID = {t.id: t for t in TYPES.values()}
