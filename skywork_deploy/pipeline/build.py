"""run_build: every stage of one build, in order, in one owned folder, then the verdict."""
import logging
from pathlib import Path

from ..base.errors import DeployError, ValidationError
from .runner import Runner, build_session, folder_fingerprint, write_build_manifest
from . import stages, verdict

log = logging.getLogger(__name__)


def default_output(settings):
    return f"build-{Path(str(settings.model)).name}-{settings.dtype}"


class BuildRejected(ValidationError):
    """Every stage ran but the verdict (pipeline/verdict.py) does not accept the build; `.manifest` holds it."""

    def __init__(self, message, manifest):
        super().__init__(message)
        self.manifest = manifest


def check_against_model(settings, model):
    """Settings the model's config rules out (sizes over its positions), before any stage runs: exit 2."""
    from ..base.errors import UsageError
    from ..base.spec import ModelSpec
    from .settings import limit_problems

    problems = limit_problems(settings, ModelSpec.from_folder(model).max_positions)
    if problems:
        raise UsageError(f"{model / 'config.json'}: the build settings do not fit the model: {'; '.join(problems)}")


def run_build(settings, force=False, echo=None, allow_unvalidated=False, require_compile=False):
    """Run every stage of `settings` (a checked BuildSettings). Returns the build manifest (a dict).

    The manifest's `verdict` names each stage's measured outcome. Raises BuildRejected after writing the
    manifest when the verdict does not accept the build: a failed check; a skipped check unless
    `allow_unvalidated`; a dry-run compile only with `require_compile`. A stage that raises gets `.stage`
    and `.verdict` (the verdict line of the stages so far) set on its error.
    """
    from ..base.fsutil import write_text
    from ..patch import resolve_model

    settings.check()
    build_dir = Path(settings.output or default_output(settings)).resolve()
    settings.output = str(build_dir)
    if Path(settings.model).expanduser().exists():  # record local paths absolutely: build.yaml works from anywhere
        settings.model = str(Path(settings.model).expanduser().resolve())
    if settings.calib.source and Path(settings.calib.source).exists():
        settings.calib.source = str(Path(settings.calib.source).resolve())
    if settings.eval.dataset and Path(settings.eval.dataset).exists():
        settings.eval.dataset = str(Path(settings.eval.dataset).resolve())
    model = resolve_model(settings.model, settings.revision)  # before anything is made: a bad model leaves nothing
    check_against_model(settings, model)
    identity = {"source": settings.model, "revision": settings.revision, "folder": str(model.resolve()),
                "fingerprint": folder_fingerprint(model)}
    # locked for this build; owns only what it wrote; manifest.json removed until the end
    with build_session(build_dir, inputs=[settings.model, settings.calib.source, settings.eval.dataset]) as folder:
        write_text(build_dir / "build.yaml", settings.to_yaml())
        runner = Runner(build_dir, force=force, echo=echo, folder=folder)
        planned = stages.plan(settings, model, build_dir)
        try:
            for name, upstream, options, fn in planned:
                runner.run(name, options, upstream, fn, inputs_identity=identity["fingerprint"])
        except DeployError as exc:  # name the stage and what the others did, for the CLI's last line
            exc.stage = runner.running
            exc.verdict = verdict.failure_line(verdict.stage_outcomes(runner.results), runner.running,
                                               " ".join(line.strip() for line in str(exc).splitlines()[:2]),
                                               [p[0] for p in planned])
            raise
        validation = verdict.validation_figures(runner.results)
        decision = verdict.decide(verdict.stage_outcomes(runner.results), allow_unvalidated, require_compile)
        manifest = write_build_manifest(build_dir, settings, identity, runner, validation, decision)
    if not decision["accepted"]:
        raise BuildRejected(f"{build_dir / 'manifest.json'}: {decision['line']}", manifest)
    return manifest

