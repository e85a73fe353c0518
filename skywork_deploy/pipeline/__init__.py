"""Stage 7, build: patch -> calib (int8) -> quantize (int8) -> export -> validate -> compile, in one folder.

    BUILD/
      build.yaml          the effective settings (repeat the build with `-c BUILD/build.yaml`)
      manifest.json       versions, model identity, stages (options, time, peak RSS), artifacts, validation
      patch/ calib/ quantize/ export/ validate/ compile/    one folder per stage, each with its manifest
      .stages/<stage>.json                                   cache records (the key of each finished stage)

Each stage calls the stage module the CLI command of the same name calls. `compile` runs `vamc` when it is
found, otherwise it writes and checks the config as a dry run and says so.
"""
import logging
from pathlib import Path

from ..errors import ValidationError
from .runner import Runner, folder_fingerprint, write_build_manifest
from .settings import BuildSettings
from . import stages

log = logging.getLogger(__name__)


def default_output(settings):
    return f"build-{Path(str(settings.model)).name}-{settings.dtype}"


def run_build(settings, force=False, echo=None, allow_unvalidated=False):
    """Run every stage of `settings` (a checked BuildSettings). Returns the build manifest (a dict).

    Raises ValidationError after writing the manifest when a validation did not pass. A validation skipped
    for lack of memory is not a pass either, unless `allow_unvalidated` accepts it (it stays in the manifest).
    """
    from ..fsutil import write_text
    from ..patch import resolve_model

    settings.check()
    build_dir = Path(settings.output or default_output(settings)).resolve()
    settings.output = str(build_dir)
    if Path(settings.model).expanduser().exists():  # record local paths absolutely: build.yaml works from anywhere
        settings.model = str(Path(settings.model).expanduser().resolve())
    if settings.calib.source and Path(settings.calib.source).exists():
        settings.calib.source = str(Path(settings.calib.source).resolve())
    build_dir.mkdir(parents=True, exist_ok=True)
    write_text(build_dir / "build.yaml", settings.to_yaml())
    model = resolve_model(settings.model, settings.revision)
    identity = {"source": settings.model, "revision": settings.revision, "folder": str(model.resolve()),
                "fingerprint": folder_fingerprint(model)}
    runner = Runner(build_dir, force=force, echo=echo)
    for name, upstream, options, fn in stages.plan(settings, model, build_dir):
        runner.run(name, options, upstream, fn, inputs_identity=identity["fingerprint"])
    validation = stages.summarize_validation(runner.results)
    failed = [name for name, v in validation.items() if not (v.get("passed") or v.get("skipped"))]
    skipped = [name for name, v in validation.items() if v.get("skipped")]
    passed = not failed and (allow_unvalidated or not skipped)
    manifest = write_build_manifest(build_dir, settings, identity, runner, validation, passed)
    if failed:
        raise ValidationError(f"{build_dir / 'manifest.json'}: validation failed in {', '.join(failed)} "
                              "(see the table above and the stage's validation.json)")
    if skipped and not allow_unvalidated:
        raise ValidationError(f"{build_dir / 'manifest.json'}: validation of {', '.join(skipped)} was skipped "
                              f"({validation[skipped[0]]['skipped']}); rerun on a machine with more memory, or "
                              "pass --allow-unvalidated to accept the artifacts without it")
    return manifest


__all__ = ["BuildSettings", "run_build", "default_output"]
