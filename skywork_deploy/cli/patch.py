"""`skywork-deploy patch`: thin CLI over skywork_deploy.patch."""
import click

from .common import CommandError, PathArg, emit_json, extra_tensors_option, handle_errors, json_option


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model", type=PathArg("model", hub=True))
@click.option("-o", "--out", type=click.Path(file_okay=False), default=None,
              help="Build a new patched folder here (weights hard-linked) instead of patching in place.")
@click.option("--revert", is_flag=True, help="Restore a folder patched in place to its original state.")
@click.option("--check", is_flag=True,
              help="Only report whether MODEL is patched with this version (exit 1 when missing or stale).")
@click.option("--insert-slice/--no-insert-slice", default=True, show_default=True,
              help="Keep only the last position before lm_head in the prefill graph.")
@click.option("--revision", default=None, help="Hub revision when MODEL is a hub id.")
@click.option("--force", is_flag=True,
              help="Re-patch or revert even over hand-edited patched files (each is kept as <name>.edited-<time>).")
@click.option("--allow-remote-code-files", is_flag=True,
              help="Accept auto_map entries in other JSON files (tokenizer, processor) that trust_remote_code runs.")
@extra_tensors_option
@json_option
@handle_errors
def patch(model, out, revert, check, insert_slice, revision, force, allow_remote_code_files, allow_extra_tensors,
          as_json):
    """Write the VACC Qwen2 model files and config_vacc.json into MODEL.

    MODEL is a local Qwen2 folder or a hub id (downloaded when a network exists). In place, every changed
    file is backed up first; `--revert` restores the folder byte for byte.

    \b
    Examples:
      skywork-deploy patch ./Skywork-OR1-7B-Preview
      skywork-deploy patch ./Skywork-OR1-7B-Preview -o ./or1-7b-vacc
      skywork-deploy patch --check ./or1-7b-vacc
      skywork-deploy patch --revert ./Skywork-OR1-7B-Preview
    """
    from .. import patch as stage

    if revert and (out or check):
        raise click.UsageError("--revert cannot be combined with --out or --check")
    if revert:
        result = stage.revert(model, force=force)
        message = f"Reverted {result['folder']}: restored {len(result['restored'])} file(s)."
    elif check:
        result = stage.patch_status(stage.resolve_model(model, revision))
        if not result["current"]:  # exit 1; with --json the group prints the result with "ok": false
            raise CommandError("; ".join(result["problems"]), details=result)
        message = f"{model}: patched with this version of skywork-deploy."
    else:
        result = stage.patch_model(model, out=out, insert_slice=insert_slice, revision=revision, force=force,
                                   allow_remote_code_files=allow_remote_code_files,
                                   allow_extra_tensors=allow_extra_tensors)
        linked = ", ".join(sorted(set(result["weights_linked"].values()))) or "in place"
        message = (f"Patched {result['folder']} in {result['seconds']:.2f} s "
                   f"({len(result['written'])} files written; weights: {linked}).")
    if as_json:
        emit_json(result)
    else:
        click.echo(message)
