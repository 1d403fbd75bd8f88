"""API keys: stored hashed, checked by one FastAPI dependency on every route except /health.

The key file holds one `sha256:<hex digest of the key>` per line (`#` comments allowed), so the
file never reveals a key. Make a line with

    printf %s "$KEY" | sha256sum | sed 's/^/sha256:/; s/ .*//'

or `python -m aigc.serve.auth KEY` (`--new` makes a random key and prints it with its line). Clients send `Authorization: Bearer <key>` (what the openai
client does with `api_key=`). With no key file the server is open, and only binds loopback.
"""

from __future__ import annotations

import hashlib
import hmac
import sys
from pathlib import Path

from fastapi import Request

from aigc.errors import AigcError

PREFIX = "sha256:"


def hash_key(key: str) -> str:
    return PREFIX + hashlib.sha256(key.encode("utf-8")).hexdigest()


def load_keys(path: str | Path) -> list[str]:
    """The hashed keys of a key file; a plaintext or malformed line is an error."""
    path = Path(path)
    if not path.is_file():
        raise AigcError(f"API key file {path} not found; create it with one sha256:<hex> line per key")
    keys = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        digest = line[len(PREFIX) :]
        if (
            not line.startswith(PREFIX)
            or len(digest) != 64
            or any(c not in "0123456789abcdef" for c in digest)
        ):
            raise AigcError(
                f"{path}:{n} is not a hashed key; each line must be sha256:<64 hex digits> "
                "(make one with `python -m aigc.serve.auth KEY`); never store keys in plain text"
            )
        keys.append(line)
    if not keys:
        raise AigcError(f"API key file {path} holds no keys; add sha256:<hex> lines or drop --api-key-file")
    return keys


class KeyChecker:
    """The FastAPI dependency: returns the caller's identity (key hash, or client host when open)."""

    def __init__(self, hashed_keys: list[str] | None) -> None:
        self.keys = list(hashed_keys or [])

    def __call__(self, request: Request) -> str:
        from aigc.serve.app import ApiError

        if not self.keys:
            return "anonymous:" + (request.client.host if request.client else "local")
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise ApiError(
                401, "missing API key: send the header 'Authorization: Bearer <key>'", "invalid_api_key"
            )
        h = hash_key(key.strip())
        # compare against every key in constant time: no early exit that leaks which one matched
        ok = False
        for k in self.keys:
            ok |= hmac.compare_digest(h, k)
        if not ok:
            raise ApiError(401, "invalid API key: check the key you were given", "invalid_api_key")
        return h


MIN_KEY_CHARS = 16  # a shorter key is guessable; secrets.token_urlsafe(32) gives 43


def main(argv: list[str]) -> int:
    """`python -m aigc.serve.auth KEY` prints KEY's key-file line; `--new` makes a random key."""
    usage = (
        "usage: python -m aigc.serve.auth KEY   (prints the key-file line for KEY)\n"
        "       python -m aigc.serve.auth --new (makes a random key; prints the key, then its line)"
    )
    if argv in (["-h"], ["--help"]):
        print(usage)
        return 0
    if argv == ["--new"]:
        import secrets

        key = secrets.token_urlsafe(32)
        print(f"key:  {key}\nline: {hash_key(key)}")
        return 0
    if len(argv) != 1 or argv[0].startswith("-"):
        print(usage, file=sys.stderr)
        return 1
    if len(argv[0]) < MIN_KEY_CHARS:
        print(
            f"error: a key needs at least {MIN_KEY_CHARS} characters, this one has {len(argv[0])}; "
            "use a longer one or make one with --new",
            file=sys.stderr,
        )
        return 1
    print(hash_key(argv[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
