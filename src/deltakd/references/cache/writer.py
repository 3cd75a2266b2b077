"""Writing one shard: encode the rows' sparse targets and save them atomically."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from deltakd.references.cache.format import ROW_KEY_BYTES, _torch_dtype


@dataclass
class CachedRow:
    """One row's targets: `positions` (n,) and a SparseTarget-like triple of leading shape (n,)."""

    key: bytes
    row_index: int
    positions: torch.Tensor  # (n,) int
    indices: torch.Tensor  # (n, k) int
    logprobs: torch.Tensor  # (n, k) float
    tail_mass: torch.Tensor  # (n,) float
    tail_coeffs: torch.Tensor | None = None  # (n, r) float, with a tail model


def encode_rows(rows: list[CachedRow], k: int, index_dtype: str, value_dtype: str,
                tail_rank: int = 0) -> dict[str, torch.Tensor]:  # fmt: skip
    """The shard's tensors (see `format` module docstring) for `rows`, in order."""
    counts = torch.tensor([int(r.positions.numel()) for r in rows], dtype=torch.int64)
    offsets = torch.zeros(len(rows) + 1, dtype=torch.int64)
    offsets[1:] = counts.cumsum(0)
    keys = torch.frombuffer(bytearray(b"".join(r.key for r in rows)), dtype=torch.uint8)

    def cat(parts: list[torch.Tensor], shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        if not parts:
            return torch.zeros(shape, dtype=dtype)
        return torch.cat([p.reshape(-1, *shape[1:]).cpu() for p in parts]).to(dtype).contiguous()

    out = {
        "row_keys": keys.reshape(len(rows), ROW_KEY_BYTES).clone(),
        "row_index": torch.tensor([r.row_index for r in rows], dtype=torch.int64),
        "row_offsets": offsets,
        "positions": cat([r.positions for r in rows], (0,), torch.int32),
        "indices": encode_indices(cat([r.indices for r in rows], (0, k), torch.int64), index_dtype),
        "logprobs": cat([r.logprobs.float() for r in rows], (0, k), _torch_dtype(value_dtype)),
        "tail_mass": cat([r.tail_mass.float() for r in rows], (0,), torch.float32),
    }
    if tail_rank:
        coeffs = [r.tail_coeffs.float() for r in rows if r.tail_coeffs is not None]
        if len(coeffs) != len(rows):
            raise ValueError("every row needs tail_coeffs when the cache has a tail model")
        out["tail_coeffs"] = cat(coeffs, (0, tail_rank), _torch_dtype(value_dtype))
    return out


def encode_indices(ids: torch.Tensor, index_dtype: str) -> torch.Tensor:
    """Token ids (N, k) int64 -> the stored form. The dtype was chosen wide enough for V, so
    every conversion is exact."""
    if index_dtype == "uint24":
        shifts = torch.tensor([0, 8, 16], dtype=torch.int64)
        return ((ids.unsqueeze(-1) >> shifts) & 0xFF).to(torch.uint8).contiguous()  # (N, k, 3)
    return ids.to(_torch_dtype(index_dtype)).contiguous()


def decode_indices(stored: torch.Tensor) -> torch.Tensor:
    """Inverse of `encode_indices`: (N, k) or (N, k, 3) uint8 -> (N, k) int64."""
    if stored.dtype == torch.uint8:
        b = stored.to(torch.int64)
        return b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16)
    return stored.to(torch.int64)


def write_shard(
    path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]
) -> int:
    """Save to `.tmp-<name>` then rename, so an interrupted build never leaves half a shard
    under a name that resume would trust. Returns the file size in bytes."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}")
    save_file(tensors, str(tmp), metadata=metadata)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path.stat().st_size
