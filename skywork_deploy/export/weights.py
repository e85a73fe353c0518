"""Initializers streamed from the safetensors shards into one external data file shared by both graphs.

Each graph input that is a parameter gets a recipe: the checkpoint tensor it comes from (or a tuple of them,
concatenated along the output channels, for projections fused by fuse.py), whether it is stored transposed,
and its ONNX element type (float32, float16, or int8 / float32 scale for quantized projections, quantized on
the fly from float weights when the folder is not quantized yet). Tensors are read one at a time with plain
file reads (no mmap, so the shards never count in this process's RSS), converted, and appended to
`model.onnx.data`; a transposed tensor is converted in column blocks (for a fused recipe, each block is the
parts' blocks side by side). Peak memory is about one source tensor (one fused group) plus one block,
whatever the number of layers; one reader thread fetches the next tensor while this one is written (one more
source tensor in memory, the read overlapping the conversion).
"""
import contextlib
import json
import struct
from pathlib import Path

import onnx

from ..base.errors import ModelFormatError
from ..base.progress import bar
from ..base.spec import checkpoint_files
from ..base.weightcheck import check_weight
from .edit import attr, bypass, index
from .int8 import Rows

DATA_FILE = "model.onnx.data"
ALIGN = 4096  # page-aligned offsets let ONNX Runtime map the data file
BLOCK_BYTES = 64 << 20
ST_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "I8": "int8", "F64": "float64",
             "I64": "int64", "I32": "int32", "U8": "uint8"}
ONNX_TYPES = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16",
              onnx.TensorProto.INT8: "int8", onnx.TensorProto.UINT8: "uint8", onnx.TensorProto.INT64: "int64"}
QUANTIZED = (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)  # uint8: int8 + 128, MatMulNBits' layout (nbits.py)


class Checkpoint:
    """The tensors of a safetensors checkpoint, read one at a time without mmap."""

    def __init__(self, folder):
        self.index = {}
        for path in checkpoint_files(folder):
            with open(path, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(n))
            for name, meta in header.items():
                if name != "__metadata__":
                    self.index[name] = (path, 8 + n, meta)

    def __contains__(self, name):
        return name in self.index

    def read(self, name):
        import torch

        if name not in self.index:
            raise ModelFormatError(f"tensor {name!r} is missing from the checkpoint (re-download the shards)")
        path, base, meta = self.index[name]
        start, end = meta["data_offsets"]
        buf = bytearray(end - start)
        with open(path, "rb") as fh:
            fh.seek(base + start)
            fh.readinto(buf)
        dtype = getattr(torch, ST_DTYPES[meta["dtype"]])
        if not buf:
            return torch.zeros(meta["shape"], dtype=dtype)
        tensor = torch.frombuffer(buf, dtype=dtype).reshape(meta["shape"])
        check_weight(tensor, name, path.name)  # NaN / Inf named here (the shard's name: `path` may be a temp link)
        return tensor


def source_dtypes(folder):
    """{state name: safetensors dtype ("BF16", "F32", ...)} of the checkpoint, from the shard headers."""
    return {name: meta["dtype"] for name, (_, _, meta) in Checkpoint(folder).index.items()}


def fold_transposes(proto, params):
    """Store weights that only feed Transpose(perm 1,0) transposed and drop those Transpose nodes."""
    _, consumers = index(proto)
    inputs = {v.name: v for v in proto.graph.input}
    renames = {}
    for name in list(params):
        users = consumers.get(name, [])
        if not users or not all(u.op_type == "Transpose" and attr(u, "perm") == [1, 0] for u in users):
            continue
        new = name + ".T"
        value = inputs[name]
        dims = [d.dim_value for d in value.type.tensor_type.shape.dim]
        value.CopyFrom(onnx.helper.make_tensor_value_info(new, value.type.tensor_type.elem_type, dims[::-1]))
        params[new] = (params.pop(name)[0], True)
        renames.update({u.output[0]: new for u in users})
    bypass(proto, renames)
    return proto


def param_specs(proto, params):
    """{graph input: (state name, transposed, onnx element type, shape)} for every parameter input."""
    specs = {}
    for value in proto.graph.input:
        if value.name in params:
            state, transposed = params[value.name]
            t = value.type.tensor_type
            specs[value.name] = (state, transposed, t.elem_type, [d.dim_value for d in t.shape.dim])
    return specs


def estimate_bytes(specs):
    sizes = {onnx.TensorProto.FLOAT: 4, onnx.TensorProto.FLOAT16: 2, onnx.TensorProto.INT8: 1,
             onnx.TensorProto.UINT8: 1}
    total = 0
    for _, _, elem, shape in specs.values():
        n = 1
        for d in shape:
            n *= d
        total += n * sizes.get(elem, 4)
    return total


class _Source:
    """Produces each recipe's tensors (as stored, before any transpose), quantizing float weights on demand."""

    def __init__(self, checkpoint):
        self.ckpt = checkpoint
        self.scales = {}
        self.rows = None  # (state, tensor) while its Rows slices are written

    def parts(self, recipe, elem):
        """[tensor]: one per state name of the recipe (a name, or a tuple of names to concatenate)."""
        import torch

        if isinstance(recipe, Rows):  # consecutive slices of one tensor: read it once, keep it for the next
            if self.rows is None or self.rows[0] != recipe.state:
                self.rows = None  # the previous tensor goes before the next is read
                self.rows = (recipe.state, self.ckpt.read(recipe.state))
            full = self.rows[1]
            if recipe.stop >= full.shape[0]:
                self.rows = None
            return [full[recipe.start:recipe.stop]]
        names = recipe if isinstance(recipe, tuple) else (recipe,)
        parts = [self.tensor(name, elem) for name in names]
        if len(parts) > 1 and parts[0].dim() == 1:  # fused scales or biases: small, concatenate here
            return [torch.cat([p.to(parts[0].dtype) for p in parts])]
        return parts

    def tensor(self, state, elem):
        from ..source_code.quantization_vacc import quantize_per_channel

        if state.endswith(".weight_scale") and state not in self.ckpt:
            weight = state[: -len("_scale")]
            if weight not in self.scales:
                self.scales[weight] = quantize_per_channel(self.ckpt.read(weight))[1]
            return self.scales.pop(weight)
        t = self.ckpt.read(state)
        if elem in QUANTIZED and t.is_floating_point():
            q, scale = quantize_per_channel(t)
            self.scales[state] = scale
            return q
        return t  # converted block by block while writing


def _recipe_key(recipe):
    """Sort key: quantized weights before their scales, so each scale comes from the cache."""
    if isinstance(recipe, Rows):
        return recipe.state, False, recipe.start
    first = recipe[0] if isinstance(recipe, tuple) else recipe
    return first.replace("_scale", ""), first.endswith("_scale"), 0


def _source_shape(parts):
    """Shape of the parts concatenated along dim 0 (output channels)."""
    if parts[0].dim() == 0:
        return []
    return [sum(p.shape[0] for p in parts)] + list(parts[0].shape[1:])


def _write_parts(fh, parts, dtype, transposed):
    """Append the parts, concatenated along dim 0 (transposed: stored as the transpose of that), to `fh`."""
    if transposed:  # column blocks of the sources become row blocks of the stored tensor
        import torch

        step = max(1, BLOCK_BYTES // max(1, sum(p.shape[0] for p in parts) * 4))
        for c in range(0, parts[0].shape[1], step):
            block = torch.cat([_cast(p[:, c:c + step], dtype) for p in parts], dim=0)  # (sum out, step)
            fh.write(block.t().contiguous().numpy().tobytes())
        return
    for t in parts:  # concatenation along dim 0 is consecutive bytes
        if t.dim() >= 2:
            step = max(1, BLOCK_BYTES // max(1, t[0].numel() * 4))
            for r in range(0, t.shape[0], step):
                fh.write(_cast(t[r:r + step], dtype).contiguous().numpy().tobytes())
        else:
            fh.write(_cast(t, dtype).contiguous().numpy().tobytes())


def _cast(t, dtype):
    """`t` as `dtype`; int8 -> uint8 is the +128 offset of MatMulNBits' zero point, not a wrap-around."""
    import torch

    if dtype == torch.uint8 and t.dtype == torch.int8:
        return t.view(torch.uint8) ^ 0x80  # two's complement: q + 128 (mod 256) is q with its top bit flipped
    return t.to(dtype)


def _torch_dtype(elem):
    import torch

    return {"float32": torch.float32, "float16": torch.float16, "int8": torch.int8, "uint8": torch.uint8,
            "int64": torch.int64}[ONNX_TYPES[elem]]


def write_initializers(folder, protos, params_list, data_path):
    """Stream every parameter of `protos` into `data_path` once; turn their inputs into external initializers.

    The graphs must share parameter names and recipes (prefill and decode do). Returns bytes written.
    """
    data_path = Path(data_path)
    specs = {}
    for proto, params in zip(protos, params_list):
        for name, spec in param_specs(proto, params).items():
            if name in specs and specs[name] != spec:
                raise ModelFormatError(f"{name}: prefill and decode disagree on this weight (internal error)")
            specs[name] = spec
    source = _Source(Checkpoint(folder))
    order = sorted(specs, key=lambda n: _recipe_key(specs[n][0]))
    locations = {}
    with open(data_path, "wb") as fh, _prefetch(source, [specs[n] for n in order]) as produced:
        for name, parts in bar(zip(order, produced), total=len(order), desc="export weights", unit="tensor"):
            recipe, transposed, elem, shape = specs[name]
            expect = shape[::-1] if transposed else shape
            if elem == onnx.TensorProto.UINT8 and len(expect) == 3:  # (N, K/bs, bs): row-major (N, K)
                expect = [expect[0], expect[1] * expect[2]]
            if _source_shape(parts) != expect or any(list(p.shape[1:]) != expect[1:] for p in parts):
                raise ModelFormatError(f"tensor {recipe}: shape {[list(p.shape) for p in parts]} in the "
                                       f"checkpoint, the config implies {expect} (config.json and the shards "
                                       "disagree)")
            size = sum(p.numel() * p.element_size() for p in parts)
            pad = (-fh.tell()) % (ALIGN if size >= ALIGN else 64)
            fh.write(b"\0" * pad)
            offset = fh.tell()
            for part in parts if elem == onnx.TensorProto.FLOAT16 else ():
                check_weight(part, recipe, "--dtype fp16", fp16=True)
            _write_parts(fh, parts, _torch_dtype(elem), transposed)
            locations[name] = (elem, shape, offset, fh.tell() - offset)
            del parts
        size = fh.tell()
    for proto in protos:
        _attach(proto, locations, data_path.name)
    return size


@contextlib.contextmanager
def _prefetch(source, specs):
    """Yield an iterator of each spec's parts; one thread reads (and quantizes) the next while this one writes.

    File reads and torch conversions release the GIL, so reading tensor i+1 overlaps converting and writing
    tensor i (2 cores). At most one tensor is read ahead: peak memory grows by one source tensor at most.
    The single reader keeps the order, which the scale cache of `_Source` relies on.
    """
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="export-read")

    def produce():
        ahead = pool.submit(source.parts, specs[0][0], specs[0][2]) if specs else None
        for i in range(len(specs)):
            parts = ahead.result()
            ahead = pool.submit(source.parts, specs[i + 1][0], specs[i + 1][2]) if i + 1 < len(specs) else None
            yield parts
            del parts

    try:
        yield produce()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _attach(proto, locations, location):
    keep, inits = [], []
    for value in proto.graph.input:
        if value.name not in locations:
            keep.append(value)
            continue
        elem, shape, offset, length = locations[value.name]
        tensor = onnx.TensorProto(name=value.name, data_type=elem, dims=shape)
        tensor.data_location = onnx.TensorProto.EXTERNAL
        for key, val in (("location", location), ("offset", str(offset)), ("length", str(length))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, val
        inits.append(tensor)
    del proto.graph.input[:]
    proto.graph.input.extend(keep)
    proto.graph.initializer.extend(inits)
