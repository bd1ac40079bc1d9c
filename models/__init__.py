"""The models Lodestar ships, as ordinary Hugging Face directories inside the package.

They load through exactly the same `from_pretrained(path)` code as a user's model directory.
"""

from __future__ import annotations

from pathlib import Path

SHIPPED = Path(__file__).resolve().parent
POLICY = "arith-policy"
PRM = "arith-prm"


def shipped_model_dir(name: str) -> Path:
    """Path of a shipped model directory; a clear error when it is not there."""
    path = SHIPPED / name
    if not (path / "config.json").is_file():
        available = sorted(p.name for p in SHIPPED.iterdir() if (p / "config.json").is_file())
        raise FileNotFoundError(f"no shipped model {name!r} at {path} (available: {available})")
    return path
