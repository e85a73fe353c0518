"""Whether the Hugging Face hub can be reached, decided in a fraction of a second before any download.

huggingface_hub retries an unreachable endpoint with back-off (tens of seconds and a warning per retry)
before it gives up; a user who passed a hub id offline should get the one-line error at once.
"""
import os
import socket
from urllib.parse import urlparse

PROBE_TIMEOUT_S = 3.0
TRUE = ("1", "true", "yes", "on")


def offline_reason(timeout=PROBE_TIMEOUT_S):
    """None when a download may be tried, else why not (HF_HUB_OFFLINE set, or the endpoint unreachable).

    Behind a proxy (HTTPS_PROXY / HTTP_PROXY) the endpoint is not probed directly: the download decides.
    """
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in TRUE:
        return "HF_HUB_OFFLINE is set"
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY")):
        return None
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host = endpoint.hostname or "huggingface.co"
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as exc:
        return f"no network: {host}:{port} cannot be reached ({exc.strerror or type(exc).__name__})"
