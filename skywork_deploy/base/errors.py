"""The project's error types. Library code raises these; only the CLI turns them into messages.

Every message names the file, key or option at fault and says how to fix it, on one line.
"""


class DeployError(Exception):
    """Base class: a problem the user can fix. The CLI prints it as one line and exits 1."""


class InputError(DeployError):
    """A model folder, data file or option is not what the stage needs."""


class ModelFormatError(InputError):
    """config.json, safetensors shards or tokenizer files are missing, corrupt or unsupported."""


class DataFormatError(InputError):
    """A calibration source file is malformed (the message names the file and line or entry)."""


class ConfigError(InputError):
    """A setting (option, build.yaml key, compiler config value) is invalid."""


class UsageError(InputError):
    """The command line is wrong: a missing or wrong path, an option the command does not take. Exit 2."""


class NetworkError(DeployError):
    """A hub id was given but the hub cannot be reached (pass a local folder or file instead)."""


class ValidationError(DeployError):
    """An exported or quantized artifact does not compute what the reference computes."""


class ExternalToolError(DeployError):
    """An external program (vamc) is missing, failed or timed out."""


class BackendUnavailableError(DeployError):
    """A runtime backend (vaststreamx, onnxruntime) is not installed or cannot run here."""


class EndpointError(DeployError):
    """An OpenAI-compatible server answered a request with an error (the message is the server's own)."""

    def __init__(self, message, status=None):
        super().__init__(message)
        self.status = status


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP (or SIGINT), raised like Ctrl-C's KeyboardInterrupt so that every cleanup runs."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum
