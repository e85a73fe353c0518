"""The safetensors shards quantize writes: laid out in advance, each tensor written the moment it exists."""
import json
import math
import os
from pathlib import Path

from ..base.errors import DeployError
from ..base.fsutil import write_json

INDEX_NAME = "model.safetensors.index.json"
DTYPE_BYTES = {"BF16": 2, "F16": 2, "F32": 4, "I8": 1}  # sources are the float ones; I8 is what we write
TORCH_DTYPE_CODES = {"torch.bfloat16": "BF16", "torch.float16": "F16", "torch.float32": "F32", "torch.int8": "I8"}


def _entries(item):
    """(output name, safetensors dtype, shape) of the tensors one plan writes, in writing order."""
    if item.quantize:
        rows, cols = item.shape
        return [(item.out_name, "I8", (rows, cols)), (item.out_name + "_scale", "F32", (rows,))]
    return [(item.out_name, item.dtype, tuple(item.shape))]


def shard_groups(plans, shard_bytes):
    """Consecutive runs of plans whose output fits in `shard_bytes` (a bigger tensor gets a shard alone)."""
    groups, size = [], 0
    for item in plans:
        if not groups or (groups[-1] and size + item.out_bytes > shard_bytes):
            groups.append([])
            size = 0
        groups[-1].append(item)
        size += item.out_bytes
    return groups


class ShardWriter:
    """Writes safetensors shards whose layout is planned up front: the header first, then every tensor the
    moment it is produced, so nothing but the tensor in hand is held in memory (no shard-sized buffer)."""

    def __init__(self, folder, groups):
        self.folder = Path(folder)
        self.layouts = [[e for item in group for e in _entries(item)] for group in groups]
        self.names = [f"model-{i:05d}-of-{len(groups):05d}.safetensors" for i in range(1, len(groups) + 1)]
        self.sizes, self.weight_map = {}, {}
        self.shard, self.fh, self.pending = -1, None, []

    def _open_next(self):
        self._close()
        self.shard += 1
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, dtype, shape in self.layouts[self.shard]:
            n = math.prod(shape) * DTYPE_BYTES[dtype]
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors' own writer does
        path = self.folder / self.names[self.shard]
        self.fh = open(path, "wb")
        os.chmod(path, 0o644)
        self.fh.write(len(raw).to_bytes(8, "little") + raw)
        self.pending = list(self.layouts[self.shard])
        self.sizes[self.names[self.shard]] = offset

    def add(self, name, tensor):
        """Write the next planned tensor (name, dtype and shape must match the plan)."""
        import torch

        if not self.pending:
            self._open_next()
        want, dtype, shape = self.pending.pop(0)
        got = TORCH_DTYPE_CODES.get(str(tensor.dtype), str(tensor.dtype))
        if (name, dtype, tuple(shape)) != (want, got, tuple(tensor.shape)):
            raise DeployError(f"shard writer: expected {want} {dtype} {tuple(shape)}, got {name} {got} "
                               f"{tuple(tensor.shape)}")
        flat = tensor.contiguous().reshape(-1)
        try:
            self.fh.write(flat.view(torch.uint8).numpy())  # the tensor's bytes, little-endian, no extra copy
        except OSError as exc:  # name the shard (a failed write carries no file name)
            raise OSError(exc.errno, exc.strerror, str(self.folder / self.names[self.shard])) from None
        self.weight_map[name] = self.names[self.shard]

    def _close(self):
        if self.fh is not None:
            self.fh.close()
            self.fh = None

    def finish(self):
        """Close the last shard and write the index. Returns {file name: tensor bytes}."""
        self._close()
        if self.pending or self.shard != len(self.layouts) - 1:
            raise DeployError("shard writer: not every planned tensor was written (internal error; please report it)")
        write_json(self.folder / INDEX_NAME, {"metadata": {"total_size": sum(self.sizes.values())},
                                              "weight_map": self.weight_map})
        return self.sizes
