"""API-key authentication (Bearer), as the OpenAI API does it.

Keys come from an environment variable (comma-separated) or a file with one key per line — the shape of a
Kubernetes Secret mounted as a volume; a file is re-read when it changes, so a rotated Secret takes effect
without a restart. Keys are compared in constant time and never logged: the log says how many keys are loaded
and from where, nothing else.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
from collections.abc import Iterable
from pathlib import Path

from serving.api import APIError
from serving.config import AuthConfig

logger = logging.getLogger(__name__)


def unauthorized(message: str) -> APIError:
    return APIError(401, message, code="invalid_api_key")


def _digest(key: str) -> bytes:
    # Comparing fixed-length digests keeps compare_digest from leaking a key's length through timing.
    return hashlib.sha256(key.encode("utf-8")).digest()


def parse_keys(text: str, sep: str | None) -> list[str]:
    """Keys from text: split on `sep` (None: lines), stripped, blanks and `#` comment lines dropped."""
    parts: Iterable[str] = text.splitlines() if sep is None else text.split(sep)
    return [k.strip() for k in parts if k.strip() and not k.strip().startswith("#")]


class APIKeyAuth:
    """Checks `Authorization: Bearer <key>` against the configured keys; a no-op when auth is off."""

    def __init__(self, keys: Iterable[str] = (), *, enabled: bool = True, keys_file: str | None = None) -> None:
        self.enabled = enabled
        self._file = Path(keys_file) if keys_file else None
        self._file_mtime: float | None = None
        self._env_digests = [_digest(k) for k in keys]
        self._file_digests: list[bytes] = []
        if self._file is not None:
            self._reload_file()
        if enabled and not (self._env_digests or self._file_digests):
            raise ValueError(
                "API-key auth is enabled but no key was found: set the keys environment variable or point the keys "
                "file at a non-empty file (see serving.config.AuthConfig)"
            )

    @classmethod
    def from_config(cls, config: AuthConfig, environ: dict[str, str] | None = None) -> APIKeyAuth:
        env = os.environ if environ is None else environ
        if not config.enabled:
            return cls(enabled=False)
        keys = parse_keys(env.get(config.keys_env, ""), ",")
        keys_file = config.keys_file or env.get(config.keys_file_env) or None
        auth = cls(keys, enabled=True, keys_file=keys_file)
        logger.info(
            "API-key auth on: %d key(s) from $%s, %d from %s",
            len(auth._env_digests),
            config.keys_env,
            len(auth._file_digests),
            keys_file or "no file",
        )
        return auth

    def _reload_file(self) -> None:
        assert self._file is not None
        try:
            mtime = self._file.stat().st_mtime
        except OSError:
            if self._file_mtime is None:
                raise ValueError(f"API keys file {self._file} cannot be read") from None
            return  # keep the last keys while a Secret update swaps the file
        if mtime != self._file_mtime:
            self._file_digests = [_digest(k) for k in parse_keys(self._file.read_text(encoding="utf-8"), None)]
            self._file_mtime = mtime

    def check(self, authorization: str | None) -> None:
        """Raise a 401 unless `authorization` is `Bearer <a configured key>`."""
        if not self.enabled:
            return
        scheme, _, token = (authorization or "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise unauthorized(
                "You didn't provide an API key. You need to provide your API key in an Authorization header using "
                "Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
            )
        if self._file is not None:
            self._reload_file()
        given = _digest(token)
        # Compare against every key, without stopping at a match: the time taken does not say which key matched.
        matched = False
        for known in self._env_digests + self._file_digests:
            matched |= hmac.compare_digest(given, known)
        if not matched:
            raise unauthorized("Incorrect API key provided.")
