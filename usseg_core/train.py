"""Moved to :mod:`usseg_core.heads.stego_train`; kept until bench/ is updated (bench/scale.py,
bench/train_step.py, bench/tune_shifts.py)."""
# moved to usseg_core/heads/stego_train.py; kept until bench/ is updated
from usseg_core.heads.stego_train import StegoMethod, train_stego  # noqa: F401
