import math

import pytest

import whm


def test_whm_formula_and_edge_cases():
    assert math.isclose(whm.whm(99.7, 90.3), 93.23, abs_tol=0.005)
    assert whm.whm(0.0, 0.0) == 0.0
    assert math.isclose(whm.whm(0.5, 0.5, alpha=3.0), 0.5)
    # alpha -> 0 gives M_t, large alpha approaches M_s
    assert math.isclose(whm.whm(0.9, 0.3, alpha=0.0), 0.3)
    assert whm.whm(0.9, 0.3, alpha=1e6) == pytest.approx(0.9, rel=1e-4)


def test_recomputes_the_papers_whm_column():
    rows = whm.load_paper_results()
    table = {}
    for row in rows:
        if row["table"] == "whm":
            table.setdefault((row["dataset"], row["method"]), {})[row["metric"]] = row["value"]
    assert len(table) == 14
    for key, m in table.items():
        assert abs(whm.whm(m["M_s"], m["M_t"], alpha=0.5) - m["WHM"]) <= 0.05, key
