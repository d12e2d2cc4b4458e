"""Exit 0 when the local server is ready, 1 otherwise: the container's HEALTHCHECK.

    python -m service.healthcheck

Asks ``GET /v2/health/ready`` on 127.0.0.1 at ``NORMSERVE_PORT`` (the address the server binds may
be 0.0.0.0, which is not one to connect to). Only the standard library: it runs every few seconds.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request

__all__ = ["check", "main"]


def check(port: int, timeout_s: float = 2.0) -> tuple[bool, str]:
    """Whether the server on this port says it is ready, and what it said."""
    url = f"http://127.0.0.1:{port}/v2/health/ready"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return True, f"{url}: {response.status}"
    except urllib.error.HTTPError as e:  # 503 while loading, shutting down or not on the GPU it needs
        return False, f"{url}: {e.code} {e.read()[:300].decode(errors='replace')}"
    except (OSError, ValueError) as e:
        return False, f"{url}: {e}"


def main() -> int:
    port = os.environ.get("NORMSERVE_PORT", "8000")
    if not port.isdigit():
        print(f"NORMSERVE_PORT is {port!r}; expected a port number", file=sys.stderr)
        return 1
    ready, said = check(int(port))
    print(said, file=sys.stdout if ready else sys.stderr)
    return 0 if ready else 1


if __name__ == "__main__":
    sys.exit(main())
