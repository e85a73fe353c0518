"""Stage 2, quantize: weight-only per-channel int8 (W8A16), streamed tensor by tensor.

A plain or patched Qwen2 safetensors checkpoint (single file or sharded; bf16, fp16 or fp32) is read one
tensor at a time. q/k/v/o/gate/up/down of every decoder layer (and lm_head when asked) become
`<proj>.weight` int8 (out, in) + `<proj>.weight_scale` fp32 (out,), computed by the model code's own
`quantize_per_channel`; every other tensor is copied through in its own dtype. The output folder loads with
`skywork_deploy.base.modeling.load_model` and computes exactly what `model.quantize(8)` computes in memory.

Memory stays near the largest single tensor:
- a copied tensor is read whole and written at once;
- a quantized tensor is read in row chunks, each from a freshly opened file, so the source pages of a
  chunk are unmapped once the chunk is quantized (per-row math: chunking gives the same bits);
- shards are laid out before anything is written (consecutive tensors up to the shard size: the largest
  output tensor, at most `max_shard_bytes`, default 1 GB), so each shard's safetensors header goes first
  and every tensor is written the moment it is produced: no shard-sized buffer.
"""
import json
import logging
import math
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from ..base.errors import ConfigError, InputError, ModelFormatError
from ..base.fsutil import atomic_output_dir, check_output, sha256_file, write_json, write_text
from ..base.manifest import MANIFEST_NAME, write_manifest
from ..base.memory import peak_rss_bytes
from ..base.spec import ModelSpec, checkpoint_files, read_config, read_safetensors_header
from ..base.tokfiles import check_model_files
from ..base.weightcheck import check_weight
from . import report as quantize_report
from .shards import DTYPE_BYTES, INDEX_NAME, ShardWriter, shard_groups

log = logging.getLogger(__name__)

QUANT_METHOD = "vacc_w8a16"  # same value as source_code.quantization_vacc.QUANT_METHOD
SUPPORTED_BITS = (8,)
REPORT_NAME = "quantize_report.json"
DEFAULT_MAX_SHARD_BYTES = 1_000_000_000
CHUNK_ELEMENTS = 1 << 20  # elements per row chunk read: a 4 MB fp32 working copy
# The end-to-end check runs at every size by default (memory stays near one fp32 layer: layer-streamed). Its time
# grows with the model (~25 s per 4 layers of 7B shape on 2 cores), so above EVAL_SHORT_PARAMS parameters it
# runs on the EVAL_SHORT_PROMPTS shortest fixed prompts (stated in the report's end_to_end.prompt_subset);
# --eval runs every prompt at any size.
EVAL_SHORT_PARAMS = 10_000_000_000
EVAL_SHORT_PROMPTS = 2
# <proj> -> parent module in a decoder layer, in the vendor's order.
PROJECTIONS = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
               "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
FLOAT_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".index.json")
SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


@dataclass(frozen=True)
class TensorPlan:
    """One output tensor: where it comes from and what is done to it."""
    name: str  # source tensor name
    file: Path  # source shard
    dtype: str  # safetensors dtype code (BF16, F16, F32)
    shape: tuple
    quantize: bool
    out_name: str  # output name of the weight (lm_head.weight when a tied lm_head is quantized)

    @property
    def source_bytes(self):
        return math.prod(self.shape) * DTYPE_BYTES[self.dtype]

    @property
    def out_bytes(self):
        if not self.quantize:
            return self.source_bytes
        rows, cols = self.shape
        return rows * cols + 4 * rows  # int8 matrix + fp32 scales

    @property
    def group(self):
        """The report row: the decoder layer index as a string, or "other"."""
        m = re.match(r"model\.layers\.(\d+)\.", self.out_name)
        return m.group(1) if m else "other"


def parse_size(text):
    """'1GB', '500MB', '20MiB' or a byte count -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]I?B|B)?\s*", str(text), flags=re.IGNORECASE)
    if not m or float(m.group(1)) <= 0:
        raise ConfigError(f"--max-shard-size {text!r}: expected a size like 1GB, 500MB or 20MiB")
    return int(float(m.group(1)) * SIZE_UNITS[(m.group(2) or "").upper()])


def module_patterns(include_lm_head):
    patterns = [f"model.layers.*.{parent}.{proj}" for proj, parent in PROJECTIONS.items()]
    return patterns + (["lm_head"] if include_lm_head else [])


def _natural_key(name):
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _tensor_locations(folder, files):
    """{tensor name: (file, header entry)} over all shards, checked against the index when there is one."""
    where = {}
    for path in files:
        for name, info in read_safetensors_header(path).items():
            if name == "__metadata__":
                continue
            if name in where:
                raise ModelFormatError(f"{path}: tensor {name} is also in {where[name][0].name} "
                                       "(duplicate tensors; re-download the checkpoint)")
            where[name] = (path, info)
    index = folder / INDEX_NAME
    if index.is_file():
        for name, shard in json.loads(index.read_text(encoding="utf-8"))["weight_map"].items():
            if name not in where or where[name][0].name != shard:
                raise ModelFormatError(f"{index} maps {name} to {shard}, which does not hold it "
                                       "(re-download the index and shards)")
    return where


def _expected_shapes(spec):
    q, kv = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    h, i = spec.hidden_size, spec.intermediate_size
    return {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q),
            "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}


def plan_checkpoint(folder, include_lm_head=False):
    """Check `folder` fully and return (spec, config dict, shard files, [TensorPlan]) before anything is written."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: no such folder (pass a Qwen2 model folder holding config.json)")
    cfg = read_config(folder)
    spec = ModelSpec.from_config(cfg, name=folder.resolve().name, where=str(folder / "config.json"))
    if cfg.get("quantization_config"):
        method = cfg["quantization_config"].get("quant_method") if isinstance(cfg["quantization_config"], dict) \
            else cfg["quantization_config"]
        raise ModelFormatError(f"{folder / 'config.json'}: already quantized (quantization_config "
                               f"{method!r}); quantize the original bf16/fp16/fp32 checkpoint")
    files = checkpoint_files(folder)
    where = _tensor_locations(folder, files)
    for name, (path, info) in where.items():
        if name.endswith(".weight_scale") or info["dtype"] not in FLOAT_DTYPES:
            raise ModelFormatError(f"{path}: tensor {name} is {info['dtype']}; expected bf16, fp16 or fp32 "
                                   "weights (already quantized? quantize the original checkpoint)")
    targets = {}  # source name -> output weight name
    shapes = _expected_shapes(spec)
    for layer in range(spec.num_layers):
        for proj, parent in PROJECTIONS.items():
            name = f"model.layers.{layer}.{parent}.{proj}.weight"
            _check_shape(folder, where, name, shapes[proj])
            targets[name] = name
    lm_from_embedding = False
    if include_lm_head:
        lm_shape = (spec.vocab_size, spec.hidden_size)
        if "lm_head.weight" in where:
            _check_shape(folder, where, "lm_head.weight", lm_shape)
            targets["lm_head.weight"] = "lm_head.weight"
        elif spec.tie_word_embeddings:
            _check_shape(folder, where, "model.embed_tokens.weight", lm_shape)
            lm_from_embedding = True  # the tie is broken: lm_head gets its own int8 copy of the embedding
        else:
            raise ModelFormatError(f"{folder}: no lm_head.weight in the checkpoint and tie_word_embeddings is "
                                   "false (re-download the checkpoint or drop --include-lm-head)")
    order = sorted(where, key=lambda n: (files.index(where[n][0]), _natural_key(n)))
    plans = []
    for name in order:
        path, info = where[name]
        plans.append(TensorPlan(name, path, info["dtype"], tuple(info["shape"]), name in targets, name))
    if lm_from_embedding:
        path, info = where["model.embed_tokens.weight"]
        plans.append(TensorPlan("model.embed_tokens.weight", path, info["dtype"], tuple(info["shape"]), True,
                                "lm_head.weight"))
    return spec, cfg, files, plans


def _check_shape(folder, where, name, shape):
    if name not in where:
        raise ModelFormatError(f"{folder}: tensor {name} is missing from the checkpoint "
                               "(incomplete or not a Qwen2 checkpoint; re-download it)")
    path, info = where[name]
    if tuple(info["shape"]) != tuple(shape):
        raise ModelFormatError(f"{path}: tensor {name} has shape {tuple(info['shape'])}, config.json implies "
                               f"{tuple(shape)} (config and weights do not match)")


def _safe_open(path):
    from safetensors import safe_open

    try:
        return safe_open(str(path), framework="pt")
    except Exception as exc:  # safetensors raises its own SafetensorError for any damage it finds
        raise ModelFormatError(f"{path}: cannot read safetensors file ({exc}); re-download or re-save it") \
            from None


def _read_rows(item, start, stop):
    """Rows [start, stop) of a source tensor; the file is mapped only for this read."""
    with _safe_open(item.file) as fh:
        return fh.get_slice(item.name)[start:stop]


def _copy_tensor(item):
    """The whole source tensor (written out at once, then dropped)."""
    with _safe_open(item.file) as fh:
        tensor = fh.get_tensor(item.name)
    check_weight(tensor, item.name, item.file)
    return tensor


def _quantize_tensor(item, bits, error):
    """int8 (out, in) and fp32 scale (out,) for one projection, quantized a row chunk at a time."""
    import torch

    from ..source_code.quantization_vacc import quantize_per_channel

    rows, cols = item.shape
    q = torch.empty(rows, cols, dtype=torch.int8)
    scale = torch.empty(rows, dtype=torch.float32)
    step = max(1, CHUNK_ELEMENTS // max(cols, 1))
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        w = _read_rows(item, start, stop)  # (rows in chunk, in)
        check_weight(w, item.name, item.file, row_offset=start)
        try:
            q_chunk, s_chunk = quantize_per_channel(w, bits)
        except ValueError as exc:
            raise InputError(f"{item.file}: tensor {item.name}: {exc} (the checkpoint is damaged; "
                             "re-download or re-save it)") from None
        error.update(w, q_chunk, s_chunk)
        q[start:stop] = q_chunk
        scale[start:stop] = s_chunk
        del w, q_chunk, s_chunk
    return q, scale


def quantization_config(bits, include_lm_head, source_dtype):
    return {"quant_method": QUANT_METHOD, "bits": bits, "group": "per_channel", "symmetric": True,
            "scale_dtype": "float32", "modules": module_patterns(include_lm_head),
            "include_lm_head": bool(include_lm_head), "source_dtype": source_dtype}


def _quantized_config(cfg, qconfig, untie):
    out = dict(cfg)
    out["quantization_config"] = qconfig
    if untie:  # lm_head now has its own int8 weight; a tie would overwrite it with the embedding
        out["tie_word_embeddings"] = False
    return out


def _carry_over(src, dst, qconfig, untie):
    """Copy the small files (tokenizer, generation config, patched sources...) and write the configs."""
    copied, skipped = [], []
    for item in sorted(src.iterdir()):
        name = item.name
        if name.startswith(".") or name in (MANIFEST_NAME, REPORT_NAME):
            continue
        if item.is_dir() or name.endswith(WEIGHT_SUFFIXES):
            if not name.endswith(".safetensors") and name != INDEX_NAME:
                skipped.append(name)
            continue
        if name in ("config.json", "config_vacc.json"):
            cfg = json.loads(item.read_text(encoding="utf-8"))
            write_text(dst / name, json.dumps(_quantized_config(cfg, qconfig, untie), indent=2,
                                              ensure_ascii=False) + "\n")
        else:
            shutil.copy2(item, dst / name)
        copied.append(name)
    if skipped:
        log.warning("not carried over (folders and non-safetensors weights): %s", ", ".join(skipped))
    return copied, skipped


def quantize_model(model, out, bits=8, include_lm_head=False, evaluate=None, max_shard_bytes=None,
                   overwrite=False, progress=False, min_top1=None, max_kl=None, allow_extra_tensors=False):
    """Quantize the checkpoint in folder `model` into the new folder `out`. Returns a result dict.

    evaluate: True (every fixed prompt) / False (skipped) / None (auto: every prompt up to EVAL_SHORT_PARAMS
    parameters, the EVAL_SHORT_PROMPTS shortest above, for time). The check is layer-streamed (about one fp32
    layer in memory), so it runs at any size.
    min_top1 / max_kl: the accuracy gate of that check (quantize_report.MIN_TOP1 / MAX_KL when None); outside
    it, ValidationError and nothing written.
    """
    start = time.perf_counter()
    if bits not in SUPPORTED_BITS:
        raise ConfigError(f"--bits {bits} is not supported (supported: {', '.join(map(str, SUPPORTED_BITS))})")
    max_shard_bytes = max_shard_bytes or DEFAULT_MAX_SHARD_BYTES
    folder, out = Path(model), Path(out)
    spec, cfg, files, plans = plan_checkpoint(folder, include_lm_head)
    check_model_files(folder, spec, allow_extra_tensors, tokenizer_required=False, vocab_coverage=False)
    check_output(out, [folder], overwrite)  # the output rule, before any work
    from ..patch import remote_code_problems, verify_if_patched

    if not verify_if_patched(folder)["patched"]:  # a tampered patched folder is refused, not copied on
        problems = remote_code_problems(folder)  # nor code a later trust_remote_code would run
        if problems:
            raise ModelFormatError(problems[0])
    skip_reason = "--no-eval" if evaluate is False else None
    max_prompts = EVAL_SHORT_PROMPTS if evaluate is None and spec.num_parameters > EVAL_SHORT_PARAMS else None
    subset = (f"the {EVAL_SHORT_PROMPTS} shortest fixed prompts: {spec.num_parameters / 1e9:.1f}B parameters is "
              f"above {EVAL_SHORT_PARAMS / 1e9:.0f}B (time; --eval checks every prompt)") if max_prompts else None
    source_dtype = "+".join(sorted({FLOAT_DTYPES[p.dtype] for p in plans if p.quantize}))
    qconfig = quantization_config(bits, include_lm_head, source_dtype)
    untie = include_lm_head and any(p.out_name != p.name for p in plans)
    shard_bytes = min(max_shard_bytes, max((p.out_bytes for p in plans), default=1))
    with atomic_output_dir(out, overwrite=overwrite, inputs=[folder]) as tmp:
        writer = ShardWriter(tmp, shard_groups(plans, shard_bytes))
        errors = _stream(plans, writer, bits, progress)
        shard_sizes = writer.finish()
        report = quantize_report.build_report(plans, errors)
        copied, skipped = _carry_over(folder, tmp, qconfig, untie)
        if skip_reason:
            report["end_to_end"] = {"skipped": skip_reason}
        else:
            report["end_to_end"] = quantize_report.evaluate(folder, tmp, bits, include_lm_head,
                                                            max_prompts=max_prompts, subset=subset)
        quantize_report.check_thresholds(report["end_to_end"], min_top1, max_kl)  # the stated accuracy gate
        failed = quantize_report.threshold_error(out, report["end_to_end"])
        if failed:  # outside the thresholds: nothing is left in OUT
            raise failed
        write_json(tmp / REPORT_NAME, report)
        options = {"bits": bits, "include_lm_head": include_lm_head, "max_shard_bytes": max_shard_bytes,
                   "shard_bytes": shard_bytes, "evaluate": skip_reason is None}
        inputs = {"folder": str(folder.resolve()), "config.json": sha256_file(folder / "config.json"),
                  "shards": {f.name: sha256_file(f) for f in files}}
        outputs = {"shards": {name: sha256_file(tmp / name) for name in shard_sizes}, "index": INDEX_NAME,
                   "report": REPORT_NAME, "carried_over": copied, "not_carried_over": skipped}
        write_manifest(tmp, "quantize", model=spec.name, quantization_config=qconfig, options=options,
                       inputs=inputs, outputs=outputs, totals=report["total"])
    return {"folder": str(out), "model": spec.name, "quantization_config": qconfig, "shards": shard_sizes,
            "report": report, "seconds": round(time.perf_counter() - start, 3),
            "peak_rss_bytes": peak_rss_bytes()}


def _stream(plans, writer, bits, progress):
    """Quantize or copy every planned tensor into the shard writer; returns {out name: WeightError}."""
    from ..base.progress import bar

    errors = {}
    for item in bar(plans, total=len(plans), desc="quantize", unit="tensor") if progress else plans:
        if item.quantize:
            errors[item.out_name] = quantize_report.WeightError()
            q, scale = _quantize_tensor(item, bits, errors[item.out_name])
            writer.add(item.out_name, q)
            writer.add(item.out_name + "_scale", scale)
            del q, scale
        else:
            writer.add(item.out_name, _copy_tensor(item))
    return errors
