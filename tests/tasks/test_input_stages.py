"""The head input stages are a table (tasks/inputs.py): a row per declared input, in a fixed order."""
from __future__ import annotations

from tasks.inputs import INPUT_STAGES, stages_for
from usseg_core.heads import get_head, list_heads
from usseg_core.heads.registry import INPUTS


def test_one_row_per_declared_input_in_order():
    names = [row.name for row in INPUT_STAGES]
    assert sorted(names) == sorted(INPUTS)
    assert names.index("five_crop") < names.index("knn")  # KNN mines the five-crop features
    assert names.index("oversegment") < names.index("views")  # a detector that cannot be built fails early


def test_rows_a_head_runs():
    assert [r.name for r in stages_for({"knn"})] == ["five_crop", "knn"]
    assert [r.name for r in stages_for({"views", "oversegment"})] == ["oversegment", "views"]
    for name in list_heads():
        assert {r.name for r in stages_for(get_head(name).needs)} >= set(get_head(name).needs)
