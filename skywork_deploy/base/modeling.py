"""Load our VACC Qwen2 (the packaged `source_code/`) and the transformers reference from a model folder.

Every stage computes through the same three source files that `patch` writes: here they are imported
as `skywork_deploy.source_code`, which is what a patched folder holds byte for byte.
"""
import logging
import warnings
from pathlib import Path

from .errors import ModelFormatError
from .spec import ModelSpec, read_config

log = logging.getLogger(__name__)
DTYPES = {"fp32": "float32", "float32": "float32", "fp16": "float16", "float16": "float16",
          "bf16": "bfloat16", "bfloat16": "bfloat16"}


def torch_dtype(name):
    import torch

    if name not in DTYPES:
        raise ModelFormatError(f"unknown dtype {name!r} (choose fp32, fp16 or bf16)")
    return getattr(torch, DTYPES[name])


def _quiet_loading():
    """transformers at the CLI's library level (errors only unless -v/-vv) and its bars only when ours show."""
    import transformers

    from .progress import enabled
    from .verbosity import library_level

    transformers.logging.set_verbosity(library_level())
    if not enabled():
        transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*past_key_values.*")


def load_model(folder, dtype="fp32", insert_slice=None):
    """Our Qwen2ForCausalLM from a plain, patched or quantized folder, in eval mode.

    The quantized layers of a `skywork-deploy quantize` folder are rebuilt from its config and loaded as int8.
    """
    from ..source_code.configuration_qwen2_vacc import Qwen2Config
    from ..source_code.modeling_qwen2_vacc import Qwen2ForCausalLM

    folder = Path(folder)
    ModelSpec.from_folder(folder)  # clear errors before transformers sees the folder
    _quiet_loading()
    try:
        config = Qwen2Config.from_pretrained(str(folder))
        if insert_slice is not None:
            config.insert_slice = insert_slice
        kwargs = {"config": config}
        kwargs["dtype" if _major() >= 5 else "torch_dtype"] = torch_dtype(dtype)
        model = Qwen2ForCausalLM.from_pretrained(str(folder), **kwargs)
    except ValueError as exc:
        raise ModelFormatError(f"{folder}: {exc}") from None
    return model.eval()


def load_reference(folder, dtype="fp32"):
    """transformers' own Qwen2ForCausalLM (eager attention): the model ours must equal."""
    from transformers import Qwen2ForCausalLM

    _quiet_loading()
    kwargs = {"attn_implementation": "eager", ("dtype" if _major() >= 5 else "torch_dtype"): torch_dtype(dtype)}
    cfg = read_config(folder)
    if cfg.get("quantization_config"):
        raise ModelFormatError(f"{folder}: quantized folder; the reference needs the original checkpoint")
    return Qwen2ForCausalLM.from_pretrained(str(folder), **kwargs).eval()


def _major():
    import transformers

    return int(transformers.__version__.split(".")[0])
