"""export_model: one bundle from a model folder (the flow is drawn in the package docstring, export/__init__.py):
options checked, graphs traced and edited, weights streamed, then validated (verify.py) and the manifest written."""
import logging
import os
import shutil
import time
from pathlib import Path

from ..base.errors import ConfigError, InputError, ModelFormatError, ValidationError
from ..base.fsutil import atomic_output_dir, check_output, sha256_file, work_dir, write_json
from ..base.manifest import write_manifest
from ..base.memory import peak_rss_bytes
from ..base.spec import TOKENIZER_SIDE_FILES, ModelSpec, read_config
from ..base.tokfiles import check_model_files

log = logging.getLogger(__name__)
DTYPES = ("fp32", "fp16", "int8")
INT8_FORMATS = ("vacc", "standard")
ORT_OPS = ("contrib", "onnx")
GRAPHS = ("prefill", "decode")
SEQ_MULTIPLE = 16


def check_options(spec, dtype, int8_format, seq_lens, quantized, ort_ops="contrib"):
    """Validated (dtype, int8_format, seq_lens, ort_ops); raises ConfigError naming the option.

    ort_ops is None for the vacc flavour (its graph is the vendor's, not ONNX Runtime's)."""
    if quantized:
        if dtype not in (None, "int8"):
            raise ConfigError(f"--dtype {dtype}: the model folder is quantized (vacc_w8a16); use --dtype int8 "
                              "or export the original checkpoint")
        dtype = "int8"
    dtype = dtype or "fp32"
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
    if int8_format not in INT8_FORMATS:
        raise ConfigError(f"--int8-format {int8_format}: choose vacc or standard")
    if ort_ops not in ORT_OPS:
        raise ConfigError(f"--ort-ops {ort_ops}: choose contrib (ONNX Runtime's fused kernels) or onnx "
                          "(standard ONNX operators only)")
    if seq_lens:
        for n in seq_lens:
            if n <= 0 or n % SEQ_MULTIPLE:
                raise ConfigError(f"--seq-len {n}: every sequence-length bucket must be a positive multiple of "
                                  f"{SEQ_MULTIPLE} (e.g. {max(SEQ_MULTIPLE, n // SEQ_MULTIPLE * SEQ_MULTIPLE)})")
            if n > spec.max_positions:
                raise ConfigError(f"--seq-len {n}: longer than max_position_embeddings ({spec.max_positions}) "
                                  "in config.json")
        seq_lens = sorted(set(seq_lens))
    int8_format = int8_format if dtype == "int8" else None
    return dtype, int8_format, (seq_lens or None), (None if int8_format == "vacc" else ort_ops)


def _prepare_folder(folder, workdir, allow_extra_tensors=False):
    """A patched folder to read from: `folder` itself when current, else a patched temporary copy."""
    from ..patch import patch_model, remote_code_problems, verify_if_patched

    if verify_if_patched(folder)["current"]:  # a patched folder that changed is refused, naming the change
        return folder, False
    problems = remote_code_problems(folder)  # nothing a later trust_remote_code could run rides along
    if problems:
        raise ModelFormatError(problems[0])
    patched = Path(workdir) / "patched"
    patch_model(str(folder), out=str(patched), allow_extra_tensors=allow_extra_tensors, check_vocab=False)
    return patched, True


def _check_disk(out, need):
    probe = Path(out).resolve().parent
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < need:
        raise InputError(f"{out}: not enough disk space ({free / 2**30:.2f} GiB free, the bundle needs about "
                         f"{need / 2**30:.2f} GiB); free space or choose another output folder")


def build_graphs(folder, dtype, int8_format, seq_lens, ort_ops="contrib"):
    """(protos, params) of prefill and decode, weightless, int8 flavour applied and transposes folded."""
    from . import attention, contrib, fuse, graphs, int8, weights

    is_int8 = dtype == "int8"
    model = graphs.skeleton(folder, "fp32" if is_int8 else dtype, int8=is_int8)
    fixed = seq_lens[0] if seq_lens and len(seq_lens) == 1 else None
    protos, params_list = [], []
    patches = int8.vacc_patches() if is_int8 else []
    if ort_ops == "contrib":  # ONNX Runtime graphs: its fused kernels for norm, rotary and attention
        patches += contrib.ort_patches()
    elif ort_ops == "onnx":  # ONNX Runtime graphs in standard ops: grouped-query attention without repeating K/V
        patches += attention.ort_patches()
    with graphs.export_patches(patches):
        for kind in GRAPHS:
            proto, names = graphs.trace(model, kind, seq=fixed if kind == "prefill" else None)
            params = {k: (v, False) for k, v in names.items()}
            if is_int8 and int8_format == "standard":
                int8.to_standard(proto, params)
            int8.ensure_domain(proto)
            weights.fold_transposes(proto, params)
            if int8_format != "vacc":  # ONNX Runtime graphs only; the vacc graph keeps the vendor's op per layer
                fuse.fuse_projections(proto, params)
            if is_int8 and int8_format == "standard":  # embedding / lm_head: fp16 when the checkpoint is 16-bit
                int8.half_float_weights(proto, params, weights.source_dtypes(folder))
            protos.append(proto)
            params_list.append(params)
    del model
    return protos, params_list


def export_model(model, out, dtype=None, int8_format="standard", seq_lens=None, simplify=True, overwrite=False,
                 ort_ops="contrib", validation="auto", allow_extra_tensors=False):
    """Export MODEL (plain, patched or quantized folder) into bundle `out`; returns a result dict.

    validation: how ONNX Runtime runs the graphs for the check (verify.py): `whole` (one session per graph),
    `streamed` (cut at decoder layers, one piece's session at a time), `auto` (whole when it fits, else
    streamed)."""
    import onnx

    from . import int8, nbits, weights
    from .simplify import simplify as run_simplify
    from .verify import VALIDATIONS, validate_bundle
    from ..patch import resolve_model

    start = time.perf_counter()
    timing = {}  # seconds per phase, in the manifest and the result
    src = resolve_model(str(model))
    spec = ModelSpec.from_folder(src)
    check_model_files(src, spec, allow_extra_tensors, tokenizer_required=False, vocab_coverage=False)
    cfg = read_config(src)
    quantized = (cfg.get("quantization_config") or {}).get("quant_method") == "vacc_w8a16"
    dtype, int8_format, seq_lens, ort_ops = check_options(spec, dtype, int8_format, seq_lens, quantized, ort_ops)
    if validation not in VALIDATIONS:
        raise ConfigError(f"--validation {validation}: choose one of {', '.join(VALIDATIONS)}")
    out = Path(out)
    check_output(out, [src], overwrite)  # the output rule, before any work
    with work_dir("skywork-export-") as work:
        folder, patched_copy = _prepare_folder(src, work, allow_extra_tensors)
        protos, params_list = build_graphs(folder, dtype, int8_format, seq_lens, ort_ops)
        timing["trace"] = _lap(start)
        simplified = {}
        for i, kind in enumerate(GRAPHS):
            if simplify:
                protos[i], simplified[kind] = run_simplify(protos[i], kind)
            else:
                n = len(protos[i].graph.node)
                simplified[kind] = {"applied": False, "nodes_before": n, "nodes_after": n,
                                    "message": "--no-simplify"}
        timing["simplify"] = _lap(start, timing)
        # int8 standard: weights in MatMulNBits' layout and the pre-fused graphs over them (same params)
        fused = _prefused(protos, params_list) if dtype == "int8" and int8_format == "standard" else []
        specs = {}
        for proto, params in zip(protos, params_list):
            specs.update(weights.param_specs(proto, params))
        need = int(weights.estimate_bytes(specs) * 1.05) + (64 << 20)
        _check_disk(out, need)
        trace_seconds = time.perf_counter() - start
        with atomic_output_dir(out, overwrite=overwrite, inputs=[src]) as tmp:
            fused_params = params_list if fused else []
            data_bytes = weights.write_initializers(folder, protos + fused, params_list + fused_params,
                                                    tmp / weights.DATA_FILE)
            timing["weights"] = _lap(start, timing)
            files = {f"{kind}.onnx": proto for kind, proto in zip(GRAPHS, protos)}
            for kind, proto in zip(GRAPHS, fused):
                files.update({nbits.variant_file(kind, v): g for v, g in nbits.variants(proto).items()})
            for name, proto in files.items():
                onnx.save_model(proto, str(tmp / name))
                onnx.checker.check_model(str(tmp / name))
            _copy_side_files(folder, tmp)
            timing["save_and_check"] = _lap(start, timing)
            write_seconds = time.perf_counter() - start - trace_seconds
            export_rss = peak_rss_bytes()  # before validation loads the reference model and ORT sessions
            report = validate_bundle(tmp, folder, dtype, int8_format, spec, seq_lens, protos, validation)
            timing["validation"] = report.get("seconds", {})
            write_json(tmp / "validation.json", report)
            manifest = _manifest(tmp, src, spec, dtype, int8_format, seq_lens, ort_ops, protos, simplified,
                                 data_bytes, patched_copy, report, timing, export_rss)
            if report["passed"] is False:
                failed = out.with_name(out.name + ".failed")
                shutil.rmtree(failed, ignore_errors=True)
                os.replace(tmp, failed)
                from .validate import table
                raise ValidationError(f"{out}: the exported graphs do not match the reference; bundle kept in "
                                      f"{failed} (not in {out}):\n" + table([r for r in report["rows"]
                                                                              if not r["ok"]]))
    seconds = time.perf_counter() - start
    result = {"out": str(out), "dtype": dtype, "int8_format": int8_format, "ort_ops": ort_ops, "seq_lens": seq_lens,
              "seconds": round(seconds, 2), "trace_seconds": round(trace_seconds, 2),
              "write_seconds": round(write_seconds, 2), "peak_rss_bytes": peak_rss_bytes(),
              "export_peak_rss_bytes": export_rss, "validate_seconds": round(seconds - trace_seconds - write_seconds, 2),
              "weight_bytes": data_bytes, "nodes": {k: v["nodes_after"] for k, v in simplified.items()},
              "simplify": simplified, "validation": report, "manifest": manifest, "timing": timing,
              "custom_nodes": len(int8.custom_nodes(protos[0]))}
    return result


def _prefused(protos, params_list):
    """int8 standard graphs: weights in MatMulNBits' layout (in place); returns the pre-fused [prefill, decode]
    over the same params, or [] when no projection's K has a block size (nbits.py). Their accuracy-level
    copies (nbits.variants) are made once the weights are attached."""
    from . import nbits

    if not all(nbits.to_nbits_storage(proto, params) for proto, params in zip(protos, params_list)):
        return []
    return [nbits.prefused(proto, params, nbits.VARIANTS["nbits"][1]) for proto, params in zip(protos, params_list)]


def _lap(start, timing=None):
    """Seconds since `start` minus the phases already in `timing` (the phase that just ended)."""
    done = sum(v for v in (timing or {}).values() if isinstance(v, (int, float)))
    return round(time.perf_counter() - start - done, 2)


def _copy_side_files(folder, dst):
    for name in ("config.json",) + TOKENIZER_SIDE_FILES:
        if (Path(folder) / name).is_file():
            shutil.copy2(Path(folder) / name, dst / name)


def _io(values):
    from .weights import ONNX_TYPES

    return [{"name": x.name, "dtype": ONNX_TYPES.get(x.type.tensor_type.elem_type, "?"),
             "shape": [d.dim_param or d.dim_value for d in x.type.tensor_type.shape.dim]} for x in values]


def _manifest(bundle, src, spec, dtype, int8_format, seq_lens, ort_ops, protos, simplified, data_bytes,
              patched_copy, report, timing=None, export_rss=None):
    from . import graphs, int8, nbits, weights

    float_type = "float16" if dtype == "fp16" else "float32"
    variants = {}  # pre-fused MatMulNBits graphs over the same data file (nbits.py), by runtime accuracy
    for variant, (accuracy, level) in nbits.VARIANTS.items():
        files = {kind: nbits.variant_file(kind, variant) for kind in GRAPHS}
        if all((bundle / f).is_file() for f in files.values()):
            variants[variant] = {"accuracy_level": level, "int8_accuracy": accuracy,
                                 **{kind: {"file": f, "sha256": sha256_file(bundle / f)} for kind, f in files.items()}}
    graph_info = {}
    for kind, proto in zip(GRAPHS, protos):
        graph_info[kind] = {
            "file": f"{kind}.onnx", "sha256": sha256_file(bundle / f"{kind}.onnx"),
            "data_file": weights.DATA_FILE, "inputs": _io(proto.graph.input), "outputs": _io(proto.graph.output),
            "opset": graphs.OPSET, "custom_opsets": {o.domain: o.version for o in proto.opset_import if o.domain},
            "nodes": len(proto.graph.node), "simplify": simplified[kind],
            "custom_nodes": len(int8.custom_nodes(proto)),
        }
    if seq_lens is None:
        shapes = "dynamic batch, sequence and past axes"
    elif len(seq_lens) == 1:
        shapes = (f"prefill sequence axis fixed to {seq_lens[0]} (left-pad prompts to it); batch dynamic; decode "
                  "keeps a dynamic past axis (the cache grows by one per step)")
    else:
        shapes = (f"prefill sequence axis symbolic but only the buckets {seq_lens} are supported and validated "
                  "(left-pad to the smallest that fits); decode keeps a dynamic past axis")
    return write_manifest(
        bundle, "export", source=str(src), model=spec.name, dtype=dtype, int8_format=int8_format,
        seq_lens=seq_lens, seq_lens_meaning=shapes, num_layers=spec.num_layers, num_kv_heads=spec.num_kv_heads,
        head_dim=spec.head_dim, vocab_size=spec.vocab_size, kv_dtype=float_type, logits_dtype=float_type,
        graphs=graph_info, graph_variants=variants, runnable_on_onnxruntime=int8_format != "vacc",
        data_file={"file": weights.DATA_FILE, "bytes": data_bytes, "shared_by": list(GRAPHS),
                   "sha256": sha256_file(bundle / weights.DATA_FILE)},
        exporter="torch.onnx TorchScript (opset 17), traced without weights, initializers streamed",
        patched_on_the_fly=patched_copy, validation={"passed": report["passed"], "file": "validation.json",
                                                 "runs": _runs_summary(report),
                                                 **({"skipped": report["skipped"]} if "skipped" in report else {})},
        ort_ops=ort_ops, options={"dtype": dtype, "int8_format": int8_format, "seq_lens": seq_lens, "ort_ops": ort_ops},
        fp16_weights=_fp16_weights(protos[0], dtype), seconds=timing or {},
        peak_rss_before_validation_bytes=export_rss,  # trace + streaming; validation's sessions come after
    )


def _runs_summary(report):
    """{mode: {how, peak_rss_bytes, seconds, ...}}: which way each validation mode ran (verify.py)."""
    keep = ("how", "layers_per_piece", "estimate_bytes", "peak_rss_bytes", "seconds")
    return {mode: {k: run[k] for k in keep if k in run} for mode, run in (report.get("runs") or {}).items()}


def _fp16_weights(proto, dtype):
    """Float weights an int8 graph keeps in fp16 (embedding, lm_head from a 16-bit checkpoint)."""
    import onnx

    if dtype != "int8":
        return []
    return sorted(t.name for t in proto.graph.initializer if t.data_type == onnx.TensorProto.FLOAT16)
