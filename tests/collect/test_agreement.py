"""Agreement and bias numbers, checked against values worked out by hand."""

from __future__ import annotations

import json

import pytest

from collect.test_store import FixedOrder, make_store
from preftune.cli.main import main
from preftune.collect.agreement import (
    binomial_p_value,
    cohen_kappa,
    krippendorff_alpha_nominal,
    label_stats,
    raw_agreement,
)

# Two annotators on ten pair tasks; values are the better response's canonical index, or "tie".
ANN = [0, 0, 0, 0, 1, 1, 1, 0, "tie", 1]
BOB = [0, 0, 0, 1, 1, 1, 0, 0, "tie", 0]


def test_cohen_kappa_by_hand():
    """Agreement on items 1-3, 5, 6, 8, 9: p_o = 7/10.
    ann's counts 0:5, 1:4, tie:1; bob's 0:6, 1:3, tie:1, so p_e = (5*6 + 4*3 + 1*1) / 100 = 0.43.
    kappa = (0.7 - 0.43) / (1 - 0.43) = 0.27 / 0.57 = 9/19."""
    assert cohen_kappa(ANN, BOB) == pytest.approx(9 / 19)
    assert cohen_kappa([1, 1], [1, 1]) is None  # p_e = 1: undefined
    assert cohen_kappa([], []) is None
    assert cohen_kappa([0, 1, 0, 1], [0, 1, 0, 1]) == pytest.approx(1.0)


def test_krippendorff_alpha_two_annotators_by_hand():
    """Coincidences (each unit has 2 values, weight 1/(2-1) = 1 per ordered pair):
    o[0][0] = 2 * 4 (items 1, 2, 3, 8), o[1][1] = 2 * 2 (items 5, 6), o[tie][tie] = 2 (item 9),
    o[0][1] = o[1][0] = 3 (items 4, 7, 10). n_0 = 11, n_1 = 7, n_tie = 2, n = 20.
    sum_{c!=k} o = 6; sum_{c!=k} n_c n_k = 20^2 - (11^2 + 7^2 + 2^2) = 226.
    alpha = 1 - (n - 1) * 6 / 226 = 1 - 114/226 = 56/113."""
    units = [[a, b] for a, b in zip(ANN, BOB)]
    assert krippendorff_alpha_nominal(units) == pytest.approx(56 / 113)
    assert raw_agreement(units) == pytest.approx(0.7)


def test_krippendorff_alpha_with_missing_values_by_hand():
    """Units [0,0,0], [0,0,1], [1,1], [1,0,1], [0] (the last is not pairable).
    m=3 units add 1/2 per ordered pair: [0,0,0] -> o00 += 3; [0,0,1] -> o00 += 1, o01 += 1, o10 += 1;
    [1,0,1] -> o11 += 1, o01 += 1, o10 += 1; [1,1] (m=2) -> o11 += 2.
    o00 = 4, o11 = 3, o01 = o10 = 2; n_0 = 6, n_1 = 5, n = 11.
    alpha = 1 - 10 * 4 / (2 * 6 * 5) = 1/3. Raw: agreeing pairs 3 + 1 + 1 + 1 of 3 + 3 + 1 + 3 = 0.6."""
    units = [[0, 0, 0], [0, 0, 1], [1, 1], [1, 0, 1], [0]]
    assert krippendorff_alpha_nominal(units) == pytest.approx(1 / 3)
    assert raw_agreement(units) == pytest.approx(0.6)
    assert krippendorff_alpha_nominal([[1, 1], [1, 1]]) is None  # one value only: D_e = 0
    assert krippendorff_alpha_nominal([[1]]) is None


def test_krippendorff_alpha_published_example():
    """Krippendorff (2011), 'Computing Krippendorff's alpha-reliability', the nominal example with
    4 coders, 12 units and missing values: alpha = 0.743."""
    units = [[1, 1, 1], [2, 2, 3, 2], [3, 3, 3, 3], [3, 3, 3, 3], [2, 2, 2, 2], [1, 2, 3, 4], [4, 4, 4, 4],
             [1, 1, 2, 1], [2, 2, 2, 2], [5, 5, 5], [1, 1], [3]]
    assert krippendorff_alpha_nominal(units) == pytest.approx(0.743, abs=5e-4)


def test_binomial_p_value_by_hand():
    """6 of 6: two-sided p = 2 / 2^6 = 0.03125. 5 of 6: outcomes 0, 1, 5, 6 are no more likely,
    (1 + 6 + 6 + 1) / 64 = 0.21875. 3 of 6 (the most likely): 1."""
    assert binomial_p_value(6, 6) == pytest.approx(0.03125)
    assert binomial_p_value(5, 6) == pytest.approx(0.21875)
    assert binomial_p_value(3, 6) == pytest.approx(1.0)
    assert binomial_p_value(0, 0) is None


def planted_db(tmp_path):
    """Ten pair tasks (canonical response 1 always the longer), labelled by ann and bob as ANN / BOB,
    ann seeing canonical 0 on the left, bob seeing it on the right; plus one rank task both skip."""
    rows = [{"prompt": f"p{i}", "responses": [f"r{i}", f"response {i}"]} for i in range(10)]
    rows.append({"prompt": "rank", "responses": ["x", "yy", "zzz"]})
    store = make_store(tmp_path, rows)
    for name, values, order in (("ann", ANN, [0, 1]), ("bob", BOB, [1, 0])):
        clock = 100.0
        for task_id, value in enumerate(values):
            shown = store.next_task(name, overlap=2, rng=FixedOrder(order), now=clock)
            assert shown.task_id == task_id
            side = "tie" if value == "tie" else ("left" if order[0] == value else "right")
            store.submit(name, task_id, order, side, now=clock + 2 + task_id)  # 2, 3, ... 11 seconds
            clock += 20
        shown = store.next_task(name, overlap=2, rng=FixedOrder([0, 1, 2]), now=clock)
        store.submit(name, shown.task_id, [0, 1, 2], "skip", now=clock + 1)
    return store


def test_stats_on_a_planted_table(tmp_path):
    """ann: 9 decisive labels, winners 0,0,0,0,1,1,1,0,1 with canonical 0 on the left -> 5 left
    (p = P(<=4 or >=5 of 9) = 1); the longer response is canonical 1 -> 4 of 9 longer.
    bob: canonical 0 on the right, winners 0,0,0,1,1,1,0,0,0 -> 3 left (his 1s) of 9, longer 3 of 9.
    Seconds per label 2..11 (median 6.5) and 1 for the skip: median of 2..11 and 1 = 6."""
    stats = label_stats(planted_db(tmp_path))
    assert stats["tasks"] == 11 and stats["labels"] == 22 and stats["undone"] == 0
    ann, bob = stats["annotators"]["ann"], stats["annotators"]["bob"]
    assert ann["labels"] == 11 and ann["choices"] == {"pair:prefer": 9, "pair:tie": 1, "rank:skip": 1}
    assert ann["position_bias"] == {"decisive": 9, "left_chosen": 5, "left_share": pytest.approx(5 / 9, abs=1e-6),
                                    "p_value": pytest.approx(1.0)}
    assert ann["length_bias"]["longer_chosen"] == 4 and ann["length_bias"]["decisive"] == 9
    assert bob["position_bias"]["left_chosen"] == 3
    assert bob["position_bias"]["p_value"] == pytest.approx(binomial_p_value(3, 9), abs=1e-6)
    assert bob["length_bias"]["longer_chosen"] == 3
    assert ann["seconds_median"] == pytest.approx(6.0)
    agreement = stats["agreement"]["pair"]
    assert agreement["cohen_kappa"] == pytest.approx(9 / 19, abs=1e-6)
    assert agreement["krippendorff_alpha"] == pytest.approx(56 / 113, abs=1e-6)
    assert agreement["raw"] == pytest.approx(0.7)
    assert agreement["units_with_2_or_more"] == 10
    assert "rank" not in stats["agreement"]  # skips are not votes
    assert stats["tasks_by_label_count"] == {"2": 11}


def test_position_bias_of_an_annotator_who_always_picks_left(tmp_path):
    """Six decisive labels, all on the left: share 1.0, p = 2 / 64 = 0.03125 (flagged in the table)."""
    store = make_store(tmp_path, [{"prompt": f"p{i}", "responses": ["short", "a longer one"]} for i in range(6)])
    for i in range(6):
        order = [0, 1] if i % 2 else [1, 0]
        shown = store.next_task("lefty", 1, rng=FixedOrder(order))
        store.submit("lefty", shown.task_id, order, "left")
    bias = label_stats(store)["annotators"]["lefty"]
    assert bias["position_bias"]["left_share"] == 1.0
    assert bias["position_bias"]["p_value"] == pytest.approx(0.03125)
    assert bias["length_bias"] == {"decisive": 6, "longer_chosen": 3, "longer_share": 0.5, "p_value": 1.0}


def test_rank_agreement_is_pairwise(tmp_path):
    """Two rankings of x, y, z: ann x>y>z, bob x>z>y. Units (x,y): x, x; (x,z): x, x; (y,z): y, z.
    Raw 2/3; alpha over units [[0,0],[0,0],[1,2]]: o00 = 4, o12 = o21 = 1, n_0 = 4, n_1 = n_2 = 1, n = 6;
    sum_{c!=k} n_c n_k = 36 - 18 = 18 -> alpha = 1 - 5 * 2 / 18 = 4/9."""
    store = make_store(tmp_path, [{"prompt": "r", "responses": ["x", "y", "z"]}])
    for name, ranking in (("ann", [0, 1, 2]), ("bob", [0, 2, 1])):
        shown = store.next_task(name, 2, rng=FixedOrder([0, 1, 2]))
        store.submit(name, shown.task_id, [0, 1, 2], "rank", ranking=ranking)
    agreement = label_stats(store)["agreement"]["rank"]
    assert agreement["units"] == 3 and agreement["raw"] == pytest.approx(2 / 3, abs=1e-6)
    assert agreement["krippendorff_alpha"] == pytest.approx(4 / 9, abs=1e-6)
    stats = label_stats(store)["annotators"]["ann"]
    assert stats["rank_position_bias"] == {"rankings": 1, "top_shown_first": 1, "expected": pytest.approx(1 / 3)}


def test_stats_cli_json_and_table(tmp_path, capsys):
    planted_db(tmp_path).close()
    assert main(["label", "stats", "--db", str(tmp_path / "labels.sqlite"), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["agreement"]["pair"]["cohen_kappa"] == pytest.approx(9 / 19, abs=1e-6)
    assert main(["label", "stats", "--db", str(tmp_path / "labels.sqlite")]) == 0
    text = capsys.readouterr().out
    assert "Cohen's kappa 0.474" in text and "Krippendorff's alpha 0.496" in text and "ann" in text
    assert main(["label", "stats", "--db", str(tmp_path / "missing.sqlite")]) == 1
    assert "no such labels database" in capsys.readouterr().err
