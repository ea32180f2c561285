"""Heads: one registry (``registry.py``) and the methods registered in it (``builtin.py``).

    from usseg_core.heads import get_head, list_heads, load_head
    list_heads()                                  # ['stego', 'omh', 'picie']
    head = load_head("storage/head/<key>")        # a trained head, no Prefect needed
"""
from usseg_core.heads.registry import (INPUTS, HeadInputs, HeadSpec, RawHead, TrainedHead, TrainedState,
                                       config_to_dict, demo_overrides, get_head, list_heads, load_head,
                                       register_head, save_head, unregister_head)
from usseg_core.heads import builtin as _builtin  # noqa: F401,E402  (registers stego, omh, picie)

__all__ = ["INPUTS", "HeadInputs", "HeadSpec", "RawHead", "TrainedHead", "TrainedState", "config_to_dict",
           "demo_overrides", "get_head", "list_heads", "load_head", "register_head", "save_head", "unregister_head"]
