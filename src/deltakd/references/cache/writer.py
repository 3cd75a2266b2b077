"""Writing one shard: encode the rows' sparse targets and save them atomically."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from deltakd.references.cache.format import ROW_KEY_BYTES, _torch_dtype, is_packed


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
    if is_packed(index_dtype, value_dtype):
        return _encode_packed(rows, k, index_dtype, value_dtype, tail_rank)
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


def _row_table(rows: list[CachedRow]) -> dict[str, torch.Tensor]:
    counts = torch.tensor([int(r.positions.numel()) for r in rows], dtype=torch.int64)
    offsets = torch.zeros(len(rows) + 1, dtype=torch.int64)
    offsets[1:] = counts.cumsum(0)
    keys = torch.frombuffer(bytearray(b"".join(r.key for r in rows)), dtype=torch.uint8)
    return {"row_keys": keys.reshape(len(rows), ROW_KEY_BYTES).clone(),
            "row_index": torch.tensor([r.row_index for r in rows], dtype=torch.int64),
            "row_offsets": offsets}  # fmt: skip


def _encode_packed(rows: list[CachedRow], k: int, index_dtype: str, value_dtype: str,
                   tail_rank: int) -> dict[str, torch.Tensor]:  # fmt: skip
    """Format version 2 (`packing`): positions as spans of consecutive t per row, ids
    Elias–Fano coded or as `index_dtype`, values b-bit levels or as `value_dtype`, the tail mass
    and tail-model coefficients in fp16. Entries are stored in ascending id order."""
    from deltakd.references.cache import packing

    out = _row_table(rows)
    starts, lengths, per_row = [], [], [0]
    for r in rows:
        s, n = packing.positions_to_spans(r.positions.cpu().numpy().astype(np.int64))
        starts.append(s)
        lengths.append(n)
        per_row.append(per_row[-1] + len(s))
    out["span_start"] = torch.from_numpy(np.concatenate([np.zeros(0, np.int32), *starts]))
    out["span_length"] = torch.from_numpy(np.concatenate([np.zeros(0, np.int32), *lengths]))
    out["row_spans"] = torch.tensor(per_row, dtype=torch.int64)
    n = int(out["row_offsets"][-1])
    ids = np.zeros((n, k), np.int64)
    lps = np.zeros((n, k), np.float32)
    if n:
        ids = torch.cat([r.indices.reshape(-1, k).cpu().long() for r in rows]).numpy()
        lps = torch.cat([r.logprobs.reshape(-1, k).cpu().float() for r in rows]).numpy()
    order = np.argsort(ids, axis=1, kind="stable")  # ascending ids: what Elias–Fano needs
    ids = np.take_along_axis(ids, order, 1)
    lps = np.take_along_axis(lps, order, 1)
    if index_dtype == "packed":
        universe = int(ids.max()) + 1 if n else 1
        out["ef_universe"] = torch.tensor([universe], dtype=torch.int64)
        out["indices"] = torch.from_numpy(packing.encode_ids(ids, universe))
    else:
        out["indices"] = encode_indices(torch.from_numpy(ids), index_dtype)
    if value_dtype in packing.VALUE_BITS:
        out["logprobs"] = torch.from_numpy(
            packing.encode_values(lps, packing.VALUE_BITS[value_dtype])
        )
    else:
        out["logprobs"] = torch.from_numpy(lps).to(_torch_dtype(value_dtype)).contiguous()
    tails = [r.tail_mass.reshape(-1).float().cpu() for r in rows]
    out["tail_mass"] = (torch.cat(tails) if tails else torch.zeros(0)).half()
    if tail_rank:
        coeffs = [r.tail_coeffs.reshape(-1, tail_rank).float().cpu() for r in rows
                  if r.tail_coeffs is not None]  # fmt: skip
        if len(coeffs) != len(rows):
            raise ValueError("every row needs tail_coeffs when the cache has a tail model")
        c = torch.cat(coeffs) if coeffs else torch.zeros(0, tail_rank)  # (N, r)
        if value_dtype in packing.VALUE_BITS:
            # With quantised values, int8 coefficients with one scale per tail-model component
            # and shard (its largest |c| there): r bytes a position instead of 2r.
            scale = (c.abs().amax(dim=0) if len(c) else torch.ones(tail_rank)).clamp_min(1e-30)
            out["tail_coeff_scale"] = scale.float()  # (r,)
            out["tail_coeffs"] = (c / scale * 127).round().clamp(-127, 127).to(torch.int8)
        else:
            out["tail_coeffs"] = c.half()
    return {name: t.contiguous() for name, t in out.items()}


def decode_packed_rows(t: dict[str, torch.Tensor], a: int, b: int, span_a: int, span_b: int,
                       k: int, value_dtype: str) -> dict[str, torch.Tensor]:  # fmt: skip
    """Positions [a, b) of a version-2 shard (whose spans are [span_a, span_b)) -> positions,
    indices (most probable first), float32 logprobs and tail mass (and tail-model coefficients
    where the shard has them), like a version-1 row."""
    from deltakd.references.cache import packing

    positions = packing.spans_to_positions(t["span_start"][span_a:span_b].numpy(),
                                           t["span_length"][span_a:span_b].numpy())  # fmt: skip
    stored = t["indices"][a:b]
    if "ef_universe" in t:
        ids = torch.from_numpy(packing.decode_ids(stored.numpy(), k, int(t["ef_universe"][0])))
    else:
        ids = decode_indices(stored)
    if value_dtype in packing.VALUE_BITS:
        tail = t["tail_mass"][a:b].float().numpy()
        lps = torch.from_numpy(packing.decode_values(t["logprobs"][a:b].numpy(), tail, k,
                                                     packing.VALUE_BITS[value_dtype]))  # fmt: skip
    else:
        lps = t["logprobs"][a:b].float()
    lps, order = lps.sort(dim=1, descending=True, stable=True)
    out = {}
    if "tail_coeffs" in t:
        c = t["tail_coeffs"][a:b].float()
        if "tail_coeff_scale" in t:
            c = c * (t["tail_coeff_scale"].float() / 127)
        out["tail_coeffs"] = c
    return out | {"positions": torch.from_numpy(positions), "indices": ids.gather(1, order),
            "logprobs": lps, "tail_mass": t["tail_mass"][a:b].float()}  # fmt: skip


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
