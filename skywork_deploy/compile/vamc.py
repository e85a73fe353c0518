"""Stage 5, compile (driver half): find `vamc`, run `vamc compile CONFIG.yaml`, check what it wrote.

The command is a list (no shell), logged with `shlex.join`; the compiler runs in its own process group so a
timeout or Ctrl-C ends it and everything it started. Its output goes to the terminal and to
`<workspace>/<name>.compile.log`. After a zero exit, `<workspace>/<name>/` must hold at least one model suite
(mod.so, mod.json, mod.params) written by this run, each recorded with its sha256, and a `tokenizer/` that
`vastgenx serve` reads (copied from the checkpoint when vamc did not write one): output.py. That
layout is inferred from the vendor's documents; no real vamc was available to verify it.
"""
import collections
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

from .config import plan_compile, resolve_build_folder
from .settings import PREFLIGHT_CHECKS, raise_problems
from .output import OUTPUT_CHECKS, find_suites, provide_tokenizer, rank_warnings
from ..base.errors import ConfigError, ExternalToolError, InputError
from ..base.fsutil import check_not_input, check_output_file, open_new, ours_json, sha256_file, starts_with, \
    write_text
from ..base.process import find_tool, wait_interruptibly
from ..base.manifest import write_manifest

log = logging.getLogger(__name__)
ENV_VAR = "SKYWORK_DEPLOY_VAMC"
TAIL_LINES = 20
KILL_GRACE_SECONDS = 5.0
LOG_IS_OURS = starts_with(b"# command: ")  # the first line of every compile log we write


def find_vamc(explicit=None, environ=None):
    """The compiler's path: `explicit` (--vamc), else $SKYWORK_DEPLOY_VAMC, else `vamc` on PATH."""
    return find_tool("vamc", "--vamc", ENV_VAR, explicit, environ,
                     "install VastAI's compiler toolchain or pass --vamc PATH")


def vamc_command(vamc, config_path):
    return [str(vamc), "compile", str(config_path)]


def _read_config(config_path):
    """(name, workspace path, checkpoint or None, tp or None) of a vamc YAML."""
    try:
        data = yaml.safe_load(Path(config_path).read_text(encoding="utf-8"))
        name, workspace = data["name"], data["workspace"]["path"]
    except (OSError, UnicodeDecodeError, yaml.YAMLError, KeyError, TypeError) as exc:
        raise ConfigError(f"{config_path}: not a vamc config with name and workspace.path ({exc})") from None
    if not (isinstance(name, str) and isinstance(workspace, str)):
        raise ConfigError(f"{config_path}: name and workspace.path must be strings")
    frontend = data.get("frontend") if isinstance(data.get("frontend"), dict) else {}
    kwargs = frontend.get("model_kwargs") if isinstance(frontend.get("model_kwargs"), dict) else {}
    return name, workspace, frontend.get("checkpoint"), kwargs.get("tp")


def _pump(stream, sinks, tail):
    for line in stream:
        tail.append(line.rstrip("\n"))
        for sink in sinks:
            sink.write(line)
            sink.flush()


def _stop(proc):
    """SIGTERM the compiler's process group, SIGKILL it after a grace period."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(KILL_GRACE_SECONDS)
            return
        except subprocess.TimeoutExpired:
            continue


def _wait(proc, reader, timeout, log_file):
    """The compiler's exit code; on timeout or Ctrl-C its whole process group is stopped first."""
    try:
        returncode = wait_interruptibly(proc, timeout)
    except (subprocess.TimeoutExpired, KeyboardInterrupt) as exc:
        _stop(proc)
        reader.join(KILL_GRACE_SECONDS)
        log_file.write(f"# {'timed out' if isinstance(exc, subprocess.TimeoutExpired) else 'interrupted'}: "
                       "the compiler was stopped\n")
        raise
    reader.join(KILL_GRACE_SECONDS)
    if reader.is_alive():  # something vamc started still holds the pipe: end its group
        _stop(proc)
        reader.join(KILL_GRACE_SECONDS)
    return returncode


def _tail_text(tail, log_path):
    lines = "\n".join(f"    {line}" for line in tail) or "    (no output)"
    return f"log {log_path}, last {len(tail)} line(s):\n{lines}"


def run_vamc(config_path, vamc=None, timeout=None, env=None, cwd=None, echo=None):
    """Run `vamc compile config_path` and check what it wrote; returns a result dict.

    Raises ExternalToolError on any failure (the message carries the command and the log's tail).
    `env`: extra variables (e.g. VACC_STACK_SIZE); `cwd`: where vamc runs (relative workspaces resolve
    there; default the current folder); `echo`: a text stream that also receives the output (None: none).
    """
    cwd = Path(cwd or Path.cwd())
    config_path = Path(config_path).absolute()
    name, workspace, checkpoint, tp = _read_config(config_path)
    workspace = cwd / workspace
    out_dir = workspace / name
    command = vamc_command(find_vamc(vamc), config_path)
    check_not_input(out_dir, _inputs(checkpoint), "--workspace (the compiler's output)")
    workspace.mkdir(parents=True, exist_ok=True)
    log_path = workspace / f"{name}.compile.log"
    extra = dict(env or {})
    line = shlex.join([f"{k}={v}" for k, v in sorted(extra.items())] + command)
    log.info("running: %s", line)
    if echo is not None:
        echo.write(f"$ {line}\n")
    start_wall, start = time.time(), time.monotonic()
    with open_new(log_path, _inputs(checkpoint), "the compile log", LOG_IS_OURS) as log_file:
        log_file.write(f"# command: {line}\n# cwd: {cwd}\n")
        log_file.flush()
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, cwd=cwd, env={**os.environ, **extra},
                                start_new_session=True, text=True, errors="replace", bufsize=1)
        tail = collections.deque(maxlen=TAIL_LINES)
        reader = threading.Thread(target=_pump, args=(proc.stdout, [log_file] + ([echo] if echo else []), tail),
                                  daemon=True)
        reader.start()
        try:
            returncode = _wait(proc, reader, timeout, log_file)
        except subprocess.TimeoutExpired:
            raise ExternalToolError(f"vamc timed out after {timeout:g} s and was stopped: {line}; "
                                    f"raise --timeout if the model needs longer; {_tail_text(tail, log_path)}")
        finally:
            proc.stdout.close()
    seconds = round(time.monotonic() - start, 3)
    if returncode != 0:
        raise ExternalToolError(f"vamc failed with exit code {returncode}: {line}; {_tail_text(tail, log_path)}")
    suites = find_suites(out_dir, start_wall, tail=f"; {line}; {_tail_text(tail, log_path)}")
    warnings = rank_warnings(suites, tp) if isinstance(tp, int) and tp >= 1 else []
    tokenizer = provide_tokenizer(out_dir, checkpoint) if checkpoint else {
        "source": None, "files": {}, "chat_template": False, "note": "the config names no checkpoint"}
    if not tokenizer["files"]:
        warnings.append(f"{out_dir / 'tokenizer'}: no tokenizer ({tokenizer['note']}); vastgenx serve needs one")
    elif not tokenizer["chat_template"]:
        warnings.append(f"{out_dir / 'tokenizer'}: no chat template; chat completions will not use the model's format")
    for text in warnings:
        log.warning("%s", text)
    outputs = {str(p.relative_to(out_dir)): p.stat().st_size for p in sorted(out_dir.rglob("*")) if p.is_file()}
    tokenizer_ok = bool(tokenizer["files"]) and tokenizer["chat_template"]
    checks = [{"name": k, "what": v, "result": "passed" if k != "tokenizer" or tokenizer_ok else "warning"}
              for k, v in OUTPUT_CHECKS.items()]
    return {"command": command, "command_line": line, "returncode": returncode, "log": str(log_path),
            "output_dir": str(out_dir), "suites": suites, "tokenizer": tokenizer, "outputs": outputs,
            "seconds": seconds, "compiled": True, "output_checks": checks, "warnings": warnings}


def _inputs(checkpoint):
    return [checkpoint] if checkpoint else []


def write_config(path, text, checkpoint=None):
    """Write the YAML atomically (the output rule: never in the model folder, never through a link). An existing
    different file is kept as FILE.bak (or FILE.bak.N)."""
    path = Path(path)
    check_output_file(path, _inputs(checkpoint), "--config-out", ours=lambda p: True)  # not lost: kept as .bak
    path.parent.mkdir(parents=True, exist_ok=True)
    backup = None
    if path.exists():
        if path.read_bytes() == text.encode("utf-8"):
            return {"path": str(path), "written": False, "backup": None}
        backup = path.with_name(path.name + ".bak")
        n = 1
        while backup.exists():
            backup, n = path.with_name(f"{path.name}.bak.{n}"), n + 1
        shutil.copy2(path, backup)
        backup = str(backup)
    write_text(path, text)
    return {"path": str(path), "written": True, "backup": backup}


def compile_model(model_folder, settings, **kwargs):
    """One compile (see compile_models); returns its result dict."""
    return compile_models(model_folder, [settings], **kwargs)[0]


def compile_models(model_folder, settings_list, vamc=None, timeout=None, dry_run=False, config_out=None, cwd=None,
                   echo=None, config_dir=None):
    """Check every size first, then write each config and (unless dry_run) run vamc on it, one by one.

    Raises ConfigError listing every problem of every size before anything runs. Each config goes to
    `config_out` (one size only), else `config_dir/<name>.yaml` (written in a dry run too), else
    `<workspace>/<name>.yaml`. Returns one result dict per size, each
    with `compiled` (true only after vamc ran and its output passed the checks) and `checks` (every check
    run); a real run also writes `<workspace>/<name>.manifest.json` with the suites and their sha256.
    `model_folder` may be a build folder: its patched model and (int8) calibration set are used.
    """
    model_folder, settings_list = resolve_build_folder(model_folder, settings_list)
    plans = [plan_compile(model_folder, s) for s in settings_list]
    several = len(plans) > 1
    problems = [f"{p.name}: {line}" if several else line for p in plans for line in p.problems]
    names = [p.name for p in plans]
    problems += [f"name: {n} is given by {names.count(n)} sizes (give each size once)"
                 for n in dict.fromkeys(names) if names.count(n) > 1]
    if config_out and several:
        problems.append(f"--config-out {config_out}: names one file but {len(plans)} sizes are compiled "
                        "(leave it out: each config goes to <workspace>/<name>.yaml)")
    raise_problems(problems, f"the compile config for {plans[0].checkpoint}")
    if not dry_run:
        find_vamc(vamc)  # fail before writing anything when there is no compiler
    cwd = Path(cwd or Path.cwd())
    return [_compile_one(plan, vamc, timeout, dry_run, config_out or (Path(config_dir) / f"{plan.name}.yaml"
                                                                     if config_dir else None), cwd, echo)
            for plan in plans]


def _compile_one(plan, vamc, timeout, dry_run, config_out, cwd, echo):
    workspace = cwd / plan.workspace
    config_path = Path(config_out) if config_out else workspace / f"{plan.name}.yaml"
    for text in plan.warnings:
        log.warning("%s", text)
    checks = [{"name": k, "what": PREFLIGHT_CHECKS[k], "result": "passed"} for k in plan.checks]
    result = {"name": plan.name, "model": str(plan.checkpoint), "settings": plan.settings.to_dict(),
              "config_path": str(config_path), "yaml": plan.yaml_text, "env": plan.env,
              "num_parameters": plan.spec.num_parameters, "dry_run": dry_run, "config_written": None,
              "compiled": False, "checks": checks, "warnings": list(plan.warnings)}
    _check_outputs(plan, config_path if config_out or not dry_run else None, None if dry_run else workspace)
    if dry_run:
        try:
            found, missing = find_vamc(vamc), None
        except ExternalToolError as exc:
            found, missing = "vamc", str(exc)
        if config_out:
            result["config_written"] = write_config(config_path, plan.yaml_text, plan.checkpoint)
        command = vamc_command(found, config_path)
        result.update(command=command, vamc_missing=missing,
                      command_line=shlex.join([f"{k}={v}" for k, v in sorted(plan.env.items())] + command))
        return result
    result["config_written"] = write_config(config_path, plan.yaml_text, plan.checkpoint)
    run = run_vamc(config_path, vamc=vamc, timeout=timeout, env=plan.env, cwd=cwd, echo=echo)
    result.update({k: v for k, v in run.items() if k not in ("output_checks", "warnings")},
                  checks=checks + run["output_checks"], warnings=result["warnings"] + run["warnings"])
    write_manifest(workspace, "compile", name=f"{plan.name}.manifest.json", model=str(plan.checkpoint),
                   settings=plan.settings.to_dict(), config={"path": str(config_path),
                                                             "sha256": sha256_file(config_path)},
                   env=plan.env, command=run["command"], seconds=run["seconds"], log=run["log"],
                   output_dir=run["output_dir"], compiled=True, checks=result["checks"], suites=run["suites"],
                   tokenizer=run["tokenizer"], warnings=result["warnings"], outputs=run["outputs"])
    return result


def _check_outputs(plan, config_path, workspace):
    """Every path a compile writes (the config when it is written, the workspace's files when vamc runs),
    checked against the output rule before anything is written or run."""
    inputs = [plan.checkpoint]
    if workspace is not None:
        check_not_input(workspace / plan.name, inputs, "--workspace (the compiler's output)")
        check_output_file(workspace / f"{plan.name}.compile.log", inputs, "the compile log", LOG_IS_OURS)
        check_output_file(workspace / f"{plan.name}.manifest.json", inputs, "the compile manifest", ours_json)
    if config_path is not None:
        check_output_file(config_path, inputs, "--config-out", ours=lambda p: True)


def default_echo(as_json):
    """Where the compiler's output is shown: stderr when stdout carries JSON."""
    return sys.stderr if as_json else sys.stdout
