"""The SAMP decision as a pure function."""

import pytest

from quantizer.search import UnitMeasurement, back_off, frontier, greedy_order, plan_from, prefer_all_int8, search

UNITS = [
    UnitMeasurement("l0.ffn_out", drop=0.006, gain_ms=10),
    UnitMeasurement("l0.ffn_in", drop=0.002, gain_ms=10),
    UnitMeasurement("l0.qkv", drop=0.0005, gain_ms=8),
    UnitMeasurement("l0.attn_out", drop=-0.0001, gain_ms=3),  # improves the metric: free
    UnitMeasurement("l1.ffn_out", drop=0.004, gain_ms=10),
    UnitMeasurement("embeddings", drop=0.0, gain_ms=0),  # smaller, not faster
]


def test_free_units_come_first_then_by_efficiency():
    order = [u.name for u in greedy_order(UNITS)]
    assert order[0] == "l0.attn_out"
    assert order.index("l0.qkv") < order.index("l0.ffn_in") < order.index("l1.ffn_out") < order.index("l0.ffn_out")


def test_budget_is_respected_and_gain_maximized():
    plan = search(UNITS, max_drop=0.007)
    assert plan.int8 == {"l0.attn_out", "l0.qkv", "l0.ffn_in", "l1.ffn_out"}
    assert plan.predicted_drop <= 0.007
    assert plan.predicted_gain_ms == 31


def test_generous_budget_takes_every_unit_that_buys_speed():
    plan = search(UNITS, max_drop=1.0)
    assert plan.int8 == {u.name for u in UNITS if u.gain_ms > 0}


def test_zero_budget_takes_only_free_units_and_an_impossible_one_gives_fp32():
    assert search(UNITS, max_drop=0.0).int8 == {"l0.attn_out"}
    costly = [u for u in UNITS if u.drop > 0]
    assert search(costly, max_drop=0.0).is_fp32


def test_cosine_budget_is_a_second_constraint():
    units = [UnitMeasurement("a", 0.0001, 10, cosine_loss=0.004), UnitMeasurement("b", 0.0001, 5, cosine_loss=0.001)]
    assert search(units, max_drop=1.0, max_cosine_loss=0.002).int8 == {"b"}


def test_back_off_drops_the_least_efficient_unit_until_fp32():
    plan = search(UNITS, max_drop=0.007)
    smaller = back_off(plan, UNITS)
    assert smaller.int8 == plan.int8 - {"l1.ffn_out"}
    while not plan.is_fp32:
        plan = back_off(plan, UNITS)
    assert back_off(plan, UNITS).is_fp32


def test_frontier_runs_from_fp32_to_all_units():
    line = frontier(UNITS)
    assert line[0].is_fp32 and len(line[-1].int8) == len(UNITS)
    gains = [p.predicted_gain_ms for p in line]
    assert gains == sorted(gains)


def test_search_is_pure_and_validates():
    assert search(UNITS, 0.005) == search(list(reversed(UNITS)), 0.005)
    assert plan_from(UNITS, set()).is_fp32
    with pytest.raises(ValueError):
        search(UNITS, -0.1)


def test_measured_all_int8_replaces_the_searched_plan_only_when_it_fits_and_is_faster():
    assert prefer_all_int8(all_int8_clearly_faster=True, all_int8_fits=True, same_units=False)
    assert not prefer_all_int8(all_int8_clearly_faster=True, all_int8_fits=False, same_units=False)
    assert not prefer_all_int8(all_int8_clearly_faster=False, all_int8_fits=True, same_units=False)  # a tie
    assert not prefer_all_int8(all_int8_clearly_faster=True, all_int8_fits=True, same_units=True)


def test_largest_fitting_prefix_bisects_with_few_verifications():
    from quantizer.search import largest_fitting_prefix

    order = [f"u{i}" for i in range(100)]
    probes: list[int] = []

    def fits(int8: frozenset[str]) -> bool:  # a plan fits while it holds at most 37 units
        probes.append(len(int8))
        return len(int8) <= 37

    assert largest_fitting_prefix(order, fits) == frozenset(order[:37])
    assert len(probes) <= 8  # all, then about log2(100) probes
    assert largest_fitting_prefix(order, lambda int8: True) == frozenset(order)
    assert largest_fitting_prefix(order, lambda int8: not int8) == frozenset()
