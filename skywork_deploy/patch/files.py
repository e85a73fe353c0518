"""What a patch writes: the packaged VACC model files, the vendor config keys, and the names of our files."""
import json
from importlib import resources

from ..base.fsutil import sha256_bytes

SOURCE_FILES = ("configuration_qwen2_vacc.py", "modeling_qwen2_vacc.py", "quantization_vacc.py")
BACKUP_DIR = ".skywork_deploy_backup"
PATCH_MANIFEST = "skywork_deploy_patch.json"
CONFIG_FILES = ("config.json", "config_vacc.json")
AUTO_MAP = {
    "AutoConfig": "configuration_qwen2_vacc.Qwen2Config",
    "AutoModel": "modeling_qwen2_vacc.Qwen2ForCausalLM",
    "AutoModelForCausalLM": "modeling_qwen2_vacc.Qwen2ForCausalLM",
}
# config keys that decide which code runs and what it builds; quantize may change the others (dtype, tie).
PROTECTED_KEYS = (
    "auto_map", "_attn_implementation", "insert_slice", "iter_num", "model_type", "architectures",
    "num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
    "head_dim", "vocab_size", "max_position_embeddings", "rope_theta", "rope_scaling", "rms_norm_eps",
    "use_sliding_window", "sliding_window", "max_window_layers", "hidden_act",
)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")


def source_files():
    """{file name: bytes} of the packaged VACC model files."""
    pkg = resources.files("skywork_deploy.source_code")
    return {name: pkg.joinpath(name).read_bytes() for name in SOURCE_FILES}


def source_hashes():
    return {name: sha256_bytes(data) for name, data in source_files().items()}


def vacc_config(config, insert_slice=True):
    """config.json's dict with the vendor keys added (original key order kept, new keys appended)."""
    out = dict(config)
    out["auto_map"] = dict(AUTO_MAP)
    out["_attn_implementation"] = "eager"
    out["insert_slice"] = bool(insert_slice)
    # transformers 5.x saves the RoPE base only inside rope_parameters; 4.45.2 (the vendor's pin) reads the
    # top-level key and would fall back to 10000 without it
    params = config.get("rope_parameters")
    if out.get("rope_theta") is None:
        theta = params.get("rope_theta") if isinstance(params, dict) else None
        out["rope_theta"] = float(theta if theta is not None else 10000.0)
    return out


def json_bytes(data):
    return (json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def plain_name(name):
    """A file name inside the model folder (no path parts, nothing a record could use to escape)."""
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name \
        and "\0" not in name and not name.startswith("~")
