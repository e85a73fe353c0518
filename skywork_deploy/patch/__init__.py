"""Stage 1, patch: our Qwen2 files and config_vacc.json written into a model folder (stage.py), its crash-safe
backup (backup.py) and its integrity check (status.py)."""
from .files import AUTO_MAP, BACKUP_DIR, PATCH_MANIFEST, SOURCE_FILES, source_files
from .stage import patch_model, resolve_model, revert
from .status import patch_status, remote_code_problems, require_current_patch, verify_if_patched

__all__ = ["AUTO_MAP", "BACKUP_DIR", "PATCH_MANIFEST", "SOURCE_FILES", "patch_model", "patch_status",
           "remote_code_problems", "require_current_patch", "resolve_model", "revert", "source_files",
           "verify_if_patched"]
