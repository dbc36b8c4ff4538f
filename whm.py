"""Weighted harmonic mean (WHM) of training and test accuracy, the GA paper's generalization score.

    WHM = (1 + alpha) * M_s * M_t / (alpha * M_t + M_s)

M_s is the accuracy on a fixed sample of training queries and M_t on the test queries (for CSS,
MIT-States and Fashion200k, the mean of the dataset's recalls). alpha = 0.5 in the paper.
"""

from __future__ import annotations

import csv
import os

PAPER_RESULTS_CSV = os.path.join(os.path.dirname(os.path.abspath(__file__)), "paper_results.csv")


def whm(m_s: float, m_t: float, alpha: float = 0.5) -> float:
    """WHM of M_s and M_t, in the units of its inputs (0 when both are 0)."""
    denominator = alpha * m_t + m_s
    if denominator == 0:
        return 0.0
    return (1.0 + alpha) * m_s * m_t / denominator


def load_paper_results(path: str = PAPER_RESULTS_CSV) -> list[dict]:
    """Rows of the GA paper's tables: table, dataset, method, metric, value (percent)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        row["value"] = float(row["value"])
    return rows
