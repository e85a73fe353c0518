"""Stage 1, patch: our Qwen2 files and config_vacc.json written into a model folder (stage.py)."""
from .stage import (
    AUTO_MAP, BACKUP_DIR, PATCH_MANIFEST, SOURCE_FILES, patch_model, patch_status, remote_code_problems,
    require_current_patch, resolve_model, revert, source_files, verify_if_patched,
)

__all__ = ["AUTO_MAP", "BACKUP_DIR", "PATCH_MANIFEST", "SOURCE_FILES", "patch_model", "patch_status",
           "remote_code_problems", "require_current_patch", "resolve_model", "revert", "source_files",
           "verify_if_patched"]
