"""Patched model folders made without skywork_deploy (the vendor venv has only the vendor's stack).

A random-init checkpoint is written by stock transformers' Qwen2ForCausalLM, then the three files of
`source_code/` are copied beside it and `config_vacc.json` is written with `auto_map`, as `patch` does.
Also imported by tests/test_source_code.py, so the checks below run in every environment.
"""
import json
import shutil
from pathlib import Path

SOURCE = Path(__file__).resolve().parents[2] / "source_code"
SOURCE_FILES = ("configuration_qwen2_vacc.py", "modeling_qwen2_vacc.py", "quantization_vacc.py")
AUTO_MAP = {
    "AutoConfig": "configuration_qwen2_vacc.Qwen2Config",
    "AutoModel": "modeling_qwen2_vacc.Qwen2ForCausalLM",
    "AutoModelForCausalLM": "modeling_qwen2_vacc.Qwen2ForCausalLM",
}
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rope_theta=10000.0, tie_word_embeddings=False,
            rms_norm_eps=1e-6)
CONFIGS = {
    "gqa": {},
    "mha": {"num_key_value_heads": 4},
    "tied": {"tie_word_embeddings": True},
    "theta1e6": {"rope_theta": 1000000.0},
}


def make_checkpoint(folder, seed=0, **overrides):
    """A random stock Qwen2 checkpoint (safetensors, fp32) in `folder`."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(Qwen2Config(**{**TINY, **overrides}))
    with torch.no_grad():  # biases and norms away from their init values, so every tensor matters
        for name, p in model.named_parameters():
            if name.endswith(("bias", "norm.weight", "layernorm.weight")):
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(folder, safe_serialization=True)
    return Path(folder)


def patch_folder(folder, insert_slice=False, **extra):
    """Copy the source files in and write config_vacc.json (also as config.json), with a top-level rope_theta."""
    folder = Path(folder)
    for name in SOURCE_FILES:
        shutil.copy2(SOURCE / name, folder / name)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.stock.json").write_text(json.dumps(cfg, indent=2))
    if cfg.get("rope_theta") is None:
        cfg["rope_theta"] = float((cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0))
    cfg.update(auto_map=AUTO_MAP, _attn_implementation="eager", insert_slice=insert_slice, **extra)
    text = json.dumps(cfg, indent=2) + "\n"
    (folder / "config_vacc.json").write_text(text)
    (folder / "config.json").write_text(text)
    return folder


def dtype_kwarg(dtype):
    import transformers

    return {("dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"): dtype}
