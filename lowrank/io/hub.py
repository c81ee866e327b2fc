"""Whether the Hugging Face hub may be tried: not when the offline variables say so, nor when it does not answer."""

from __future__ import annotations

import functools
import os
import socket

HUB_HOST = "huggingface.co"
_OFFLINE_VARIABLES = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")


def offline() -> bool:
    """True when HF_DATASETS_OFFLINE or HF_HUB_OFFLINE is set, or the hub does not answer within 2 s (asked once
    per process): a machine without a network fails at once, naming what to set, instead of after the libraries'
    retries."""
    if any(os.environ.get(key, "").lower() in ("1", "true", "yes", "on") for key in _OFFLINE_VARIABLES):
        return True
    return not _answers(HUB_HOST)


@functools.cache
def _answers(host: str, timeout: float = 2.0) -> bool:
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError:
        return False
    return True
