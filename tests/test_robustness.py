"""The robustness table: bad inputs against every in-process entry point, no silent answer."""

import pytest

from evaluation.robustness import ENTRIES, cases, robustness_table, summary


@pytest.mark.slow
def test_no_entry_point_scores_a_bad_input_or_refuses_with_a_traceback():
    table, load = robustness_table(with_rest=False, epochs=1)
    assert len(cases()) >= 40
    assert set(table.entry) == set(ENTRIES) - {"rest"}
    wrong = table[table.outcome == "WRONG"]
    assert wrong.empty, wrong.to_string()
    grid = summary(table)
    # the estimator and the ONNX runtime agree on every case
    assert (grid["estimator"] == grid["onnx"]).all(), grid.to_string()
    assert load is None
