"""Is the Hugging Face hub usable from here? Asked before any stage runs, so that an uncached hub
model or dataset is refused in seconds rather than after a minute of download retries."""
from __future__ import annotations

import functools
import os


def hub_offline() -> bool:
    """Has the user switched the hub off (``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE``)?"""
    return any(os.environ.get(k, "").lower() in ("1", "true", "yes", "on") for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


@functools.lru_cache(maxsize=1)
def hub_reachable(timeout: float = 3.0) -> bool:
    """Can this machine open a connection to the Hugging Face hub (``HF_ENDPOINT`` or huggingface.co)?"""
    import socket
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False
