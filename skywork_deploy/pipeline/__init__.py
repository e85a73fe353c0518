"""Stage 7, build: patch -> calib (int8) -> quantize (int8) -> export -> validate -> compile, in one folder.

    BUILD/
      build.yaml          the effective settings (repeat the build with `-c BUILD/build.yaml`)
      manifest.json       versions, model identity, stages (options, time, peak RSS), artifacts, validation
      patch/ calib/ quantize/ export/ validate/ compile/    one folder per stage, each with its manifest
      .stages/<stage>.json                                   cache records (the key of each finished stage)

Each stage calls the stage module the CLI command of the same name calls. `compile` runs `vamc` when it is
found, otherwise it writes and checks the config as a dry run and says so.
"""
from .build import BuildRejected, default_output, run_build
from .settings import BuildSettings

__all__ = ["BuildRejected", "BuildSettings", "run_build", "default_output"]
