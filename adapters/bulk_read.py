"""The values of a safetensors file as float32 in one pass: one read, one conversion per file.

Reading tensor by tensor costs a few Python-level torch calls per tensor (hundreds per adapter),
which is slow and holds the GIL against the engine's step loop. Here the data section is read with
one call, viewed as its dtype and converted once; each tensor is a view into the result. The header
must already have been validated (adapters.format does it through safetensors' own parser).
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch

TORCH_DTYPES = {
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
}


def read_float32(file: Path, keys: list[str]) -> tuple[dict[str, torch.Tensor], bool | None]:
    """The named tensors of a safetensors file as float32, by key, and whether all of them are
    finite (None when not checked).

    One conversion (and one finiteness check) for the whole data section when every named tensor
    shares a dtype and is aligned to it (what PEFT writes); otherwise one conversion per tensor.
    """
    with open(file, "rb") as handle:
        (header_size,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(header_size))
        data = bytearray(os.fstat(handle.fileno()).st_size - 8 - header_size)
        if handle.readinto(data) != len(data):
            raise ValueError(f"{file} is shorter than its header says")
    entries = {key: header[key] for key in keys}
    dtypes = {entry["dtype"] for entry in entries.values()}
    if len(dtypes) == 1:
        dtype = TORCH_DTYPES[dtypes.pop()]
        size = dtype.itemsize
        aligned = all(e["data_offsets"][0] % size == 0 for e in entries.values())
        if aligned and len(data) % size == 0:
            whole = torch.frombuffer(data, dtype=dtype).float()  # [n] float32
            tensors = {
                key: whole[e["data_offsets"][0] // size : e["data_offsets"][1] // size].view(
                    e["shape"]
                )
                for key, e in entries.items()
            }
            return tensors, bool(torch.isfinite(whole).all())
    tensors = {}
    for key, e in entries.items():
        dtype = TORCH_DTYPES[e["dtype"]]
        begin, end = e["data_offsets"]
        raw = torch.frombuffer(
            data, dtype=dtype, count=(end - begin) // dtype.itemsize, offset=begin
        )
        tensors[key] = raw.float().view(e["shape"])
    return tensors, None
