"""Moved to :mod:`usseg_core.heads.stego_import`; kept until flows/ is updated (flows/cli_import.py)."""
# moved to usseg_core/heads/stego_import.py; kept until flows/ is updated
from usseg_core.heads.stego_import import file_sha256, parse_stego_checkpoint, stego_config  # noqa: F401
