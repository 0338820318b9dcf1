import pytest

from clora.metrics import (
    average_accuracy,
    backward_transfer,
    forgetting,
    forward_transfer,
    learning_accuracy,
    normalize_matrix,
    summarize,
)

# Evaluated on all tasks at every stage (eval-all), so forward transfer is defined.
# R[1][0] = 85 > R[0][0] = 80: the max in forgetting must pick the later row.
# R[0][1] = 95 (task 1 before it was trained) must NOT count in forgetting's max.
R3 = [
    [80.0, 95.0, 20.0],
    [85.0, 90.0, 40.0],
    [50.0, 70.0, 85.0],
]
Z3 = [10.0, 20.0, 30.0]
# AA          = (50 + 70 + 85) / 3                    = 205 / 3 = 68.333...
# BWT         = ((50 - 80) + (70 - 90)) / 2           = (-30 - 20) / 2 = -25
# FWT         = ((R[0][1] - Z[1]) + (R[1][2] - Z[2])) / 2 = ((95 - 20) + (40 - 30)) / 2 = 42.5
# forgetting  = ((max(80, 85) - 50) + (max(90) - 70)) / 2 = (35 + 20) / 2 = 27.5
#               (counting R[0][1] = 95 would wrongly give (35 + 25) / 2 = 30)
# learning    = (80 + 90 + 85) / 3                    = 85


def test_hand_computed_3x3():
    assert average_accuracy(R3) == pytest.approx(205 / 3)
    assert backward_transfer(R3) == pytest.approx(-25.0)
    assert forward_transfer(R3, Z3) == pytest.approx(42.5)
    assert forgetting(R3) == pytest.approx(27.5)
    assert learning_accuracy(R3) == pytest.approx(85.0)
    assert summarize(R3, Z3) == pytest.approx(
        {"AA": 205 / 3, "BWT": -25.0, "FWT": 42.5, "forgetting": 27.5, "learning_accuracy": 85.0}
    )


def test_spec_seqlora_example():
    # SPEC §4: AA = (18.8 + 40.6 + 18.8 + 59.4) / 4 = 137.6 / 4 = 34.4
    # BWT = ((18.8 - 21.9) + (40.6 - 15.6) + (18.8 - 21.9)) / 3 = 18.8 / 3 = +6.27 -> +6.3
    R = [[21.9], [15.6, 15.6], [21.9, 15.6, 21.9], [18.8, 40.6, 18.8, 59.4]]
    m = summarize(R)
    assert round(m["AA"], 1) == 34.4
    assert round(m["BWT"], 1) == 6.3
    assert m["FWT"] is None  # no zero-shot row given
    # forgetting = ((21.9 - 18.8) + (15.6 - 40.6) + (21.9 - 18.8)) / 3 = -18.8 / 3
    assert m["forgetting"] == pytest.approx(-18.8 / 3)
    # learning = (21.9 + 15.6 + 21.9 + 59.4) / 4 = 29.7
    assert m["learning_accuracy"] == pytest.approx(29.7)
    # Lower-triangular only: R[i-1][i] never evaluated, so FWT stays undefined even with Z.
    assert forward_transfer(R, [0.0] * 4) is None


def test_spec_second_seqlora_last_row():
    # SPEC §4: final row [21.9, 21.9, 28.1, 81.2] -> AA 153.1 / 4 = 38.275 -> 38.3
    R = [[87.5], [3.1, 90.0], [20.0, 30.0, 60.0], [21.9, 21.9, 28.1, 81.2]]
    assert round(average_accuracy(R), 1) == 38.3


def test_ragged_and_padded_rows_agree():
    ragged = [[21.9], [15.6, 15.6], [21.9, 15.6, 21.9], [18.8, 40.6, 18.8, 59.4]]
    padded = [row + [None] * (4 - len(row)) for row in ragged]
    assert normalize_matrix(ragged) == padded
    assert summarize(ragged) == summarize(padded)


def test_joint_single_row():
    # SPEC §4 MTL: [84.4, 21.9, 40.6, 93.8] -> AA 240.7 / 4 = 60.175 -> 60.2
    R = [[84.4, 21.9, 40.6, 93.8]]
    m = summarize(R, [0.0, 0.0, 0.0, 0.0])
    assert round(m["AA"], 1) == 60.2
    assert m["BWT"] is None and m["FWT"] is None and m["forgetting"] is None
    assert m["learning_accuracy"] is None


def test_single_task():
    m = summarize([[42.0]], [1.0])
    assert m == {"AA": 42.0, "BWT": None, "FWT": None, "forgetting": None, "learning_accuracy": 42.0}


def test_forgetting_skips_unevaluated_rows():
    # Task 0 not re-evaluated at stage 1: max over the rows that were evaluated (80 only).
    R = [[80.0], [None, 90.0], [50.0, 70.0, 85.0]]
    assert forgetting(R) == pytest.approx(((80 - 50) + (90 - 70)) / 2)


def test_fwt_none_when_zero_shot_entry_missing():
    assert forward_transfer(R3, [10.0, None, 30.0]) is None
    assert forward_transfer(R3, None) is None


@pytest.mark.parametrize(
    "R",
    [
        [],  # empty
        [[]],  # empty last row
        [[50.0], [60.0, None]],  # last row incomplete
        [[50.0, 1.0, 2.0], [60.0, 70.0]],  # a row wider than the task count
        [[50.0], [60.0, 70.0], [1.0, 2.0]],  # 3 rows for 2 tasks
        [[None, 1.0], [60.0, 70.0]],  # diagonal missing
        [[50.0], [60.0, 170.0]],  # not a percentage
        [[50.0], [60.0, float("nan")]],
        [[50.0], [60.0, "70"]],
    ],
)
def test_malformed_matrix_raises(R):
    with pytest.raises(ValueError):
        summarize(R)


def test_zero_shot_wrong_length_raises():
    with pytest.raises(ValueError):
        forward_transfer(R3, [1.0, 2.0])
