"""The SAMP decision: a pure function from per-unit measurements and a budget to a plan.

Each unit was measured alone in INT8: the metric drop it causes on the dev set and the latency it
saves. Choosing units is a 0/1 knapsack (maximize saved latency, total drop within the budget);
units are taken greedily by saved latency per unit of drop, units that cost nothing first. Drops
are treated as additive, which interactions can break, so the caller verifies the chosen plan end
to end and, when it misses the budget, asks ``back_off`` for the next plan.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class UnitMeasurement:
    name: str
    drop: float  # metric(FP32) - metric(only this unit INT8); may be negative
    gain_ms: float  # latency saved by this unit in INT8 (batch 32, sequence 128)
    cosine_loss: float = 0.0  # embeddings: 1 - mean cosine to FP32 with only this unit INT8


@dataclass(frozen=True)
class Plan:
    int8: frozenset[str]
    predicted_drop: float
    predicted_gain_ms: float

    @property
    def is_fp32(self) -> bool:
        return not self.int8


def _efficiency(unit: UnitMeasurement) -> float:
    """Saved milliseconds per point of drop; free units (drop <= 0) come first."""
    if unit.drop <= 0:
        return float("inf")
    return unit.gain_ms / unit.drop


def greedy_order(units: list[UnitMeasurement]) -> list[UnitMeasurement]:
    """Units from most to least worth quantizing (ties broken by name, so the order is stable)."""
    return sorted(units, key=lambda u: (-_efficiency(u), -u.gain_ms, u.name))


def plan_from(units: list[UnitMeasurement], names: set[str] | frozenset[str]) -> Plan:
    chosen = [u for u in units if u.name in names]
    return Plan(
        int8=frozenset(u.name for u in chosen),
        predicted_drop=sum(max(u.drop, 0.0) for u in chosen),
        predicted_gain_ms=sum(u.gain_ms for u in chosen),
    )


def search(units: list[UnitMeasurement], max_drop: float, max_cosine_loss: float | None = None) -> Plan:
    """The fastest plan whose predicted drop stays within ``max_drop`` (and, for embeddings,
    whose predicted loss of cosine to FP32 stays within ``max_cosine_loss``)."""
    if max_drop < 0 or (max_cosine_loss is not None and max_cosine_loss < 0):
        raise ValueError("budgets must be >= 0")
    chosen: set[str] = set()
    spent, spent_cosine = 0.0, 0.0
    for unit in greedy_order(units):
        if unit.gain_ms <= 0:
            continue  # buys no speed: not worth any risk
        cost = max(unit.drop, 0.0)
        cosine_ok = max_cosine_loss is None or spent_cosine + unit.cosine_loss <= max_cosine_loss
        if spent + cost <= max_drop and cosine_ok:
            chosen.add(unit.name)
            spent += cost
            spent_cosine += unit.cosine_loss
    return plan_from(units, chosen)


def back_off(plan: Plan, units: list[UnitMeasurement]) -> Plan:
    """The plan without its least efficient unit: the next thing to try when verification fails."""
    if plan.is_fp32:
        return plan
    included = [u for u in units if u.name in plan.int8]
    worst = min(included, key=lambda u: (_efficiency(u), u.gain_ms, u.name))
    return plan_from(units, plan.int8 - {worst.name})


def frontier(units: list[UnitMeasurement]) -> list[Plan]:
    """Plans along the greedy order (FP32, then one more unit at a time up to all INT8): the
    candidates a report plots as metric against latency."""
    order = greedy_order(units)
    return [plan_from(units, {u.name for u in order[:k]}) for k in range(len(order) + 1)]


def prefer_all_int8(all_int8_clearly_faster: bool, all_int8_fits: bool, same_units: bool) -> bool:
    """Whether the measured all-INT8 plan should replace the searched one. Predicted gains are
    apportioned by FLOPs, so a unit without FLOPs (the embeddings' Gather) is predicted to buy
    nothing, yet INT8 can change its latency; measurement decides: all-INT8 wins when it keeps the
    budget on dev and ran faster beyond the timing noise (a tie keeps the searched plan, which keeps
    more units in FP32 and so is at least as accurate)."""
    return all_int8_fits and not same_units and all_int8_clearly_faster


def largest_fitting_prefix(order: list[str], fits: Callable[[frozenset[str]], bool]) -> frozenset[str]:
    """The longest prefix of ``order`` (units from most to least worth quantizing) that ``fits``,
    found by bisection with one real verification per probe (about log2(n) of them).

    Used where per-unit drops are far from additive: next-token agreement of a generator loses a
    little to every unit through near-tied tokens, so summed single-unit drops overstate a plan's
    drop many times over and a knapsack on them quantizes almost nothing. Assumes that a prefix
    which fits has fitting prefixes (adding units does not make a plan better), which the caller
    verifies end to end anyway.
    """
    if fits(frozenset(order)):
        return frozenset(order)
    low, high = 0, len(order)  # order[:low] fits (the empty plan is FP32), order[:high] does not
    while high - low > 1:
        middle = (low + high) // 2
        if fits(frozenset(order[:middle])):
            low = middle
        else:
            high = middle
    return frozenset(order[:low])
