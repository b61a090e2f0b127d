"""The admission controller's decisions, on an injected clock (no event loop, no timing)."""

from __future__ import annotations

import uuid

import pytest

from api.admission import Admission
from shared.errors import Overloaded


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def admission(clock: Clock, **overrides: float) -> Admission:
    options: dict[str, float] = dict(target_s=0.02, interval_s=0.1, max_wait_s=1.0,
                                     max_in_flight=100)
    options.update(overrides)
    return Admission(target_s=options["target_s"], interval_s=options["interval_s"],
                     max_wait_s=options["max_wait_s"],
                     max_in_flight=int(options["max_in_flight"]), clock=clock)


def admitted(gate: Admission) -> bool:
    try:
        gate.admit()
    except Overloaded as exc:
        assert exc.status == 529
        assert exc.headers["retry-after"] == "1"
        return False
    return True


def test_an_idle_gate_admits() -> None:
    clock = Clock()
    gate = admission(clock)
    assert all(admitted(gate) for _ in range(1000))
    assert gate.refused == 0


def test_a_delay_above_target_for_less_than_an_interval_is_a_burst_and_admitted() -> None:
    clock = Clock()
    gate = admission(clock)
    gate.lag(0.05)
    assert admitted(gate)
    clock.now += 0.09
    assert admitted(gate)
    gate.lag(0.01)  # the queue drained within the interval
    clock.now += 0.05
    assert admitted(gate)
    gate.lag(0.05)
    clock.now += 0.09
    assert admitted(gate)  # a new excursion starts its own interval


def test_a_delay_that_stays_above_target_for_an_interval_is_refused_until_it_falls() -> None:
    clock = Clock()
    gate = admission(clock)
    gate.lag(0.05)
    assert admitted(gate)
    clock.now += 0.101
    assert not admitted(gate)
    assert not admitted(gate)
    gate.lag(0.015)
    assert admitted(gate)
    assert gate.refused == 2


def test_right_after_a_refusal_spell_a_standing_delay_is_refused_without_new_grace() -> None:
    clock = Clock()
    gate = admission(clock)
    gate.lag(0.05)
    clock.now += 0.101
    assert not admitted(gate)
    gate.lag(0.01)
    clock.now += 0.01
    assert admitted(gate)
    gate.lag(0.05)
    clock.now += 0.01
    assert not admitted(gate)  # the queue is back within an interval of the last refusal
    gate.lag(0.01)
    clock.now += 0.5
    assert admitted(gate)
    gate.lag(0.05)
    assert admitted(gate)  # long after: a new burst gets its grace again


def test_the_oldest_request_no_worker_answered_counts_as_delay() -> None:
    clock = Clock()
    gate = admission(clock)
    first, second = uuid.uuid4(), uuid.uuid4()
    gate.published(first)
    clock.now += 0.05
    gate.published(second)
    assert admitted(gate)  # above target, not yet for an interval
    clock.now += 0.101
    assert not admitted(gate)
    gate.settled(first)  # the second one has waited 0.1 s: still above
    assert not admitted(gate)
    gate.settled(second)
    assert admitted(gate)
    assert gate.waiting == 0


def test_a_delay_past_the_wait_is_refused_at_once() -> None:
    clock = Clock()
    gate = admission(clock)
    gate.lag(1.5)
    assert not admitted(gate)


def test_past_the_in_flight_cap_requests_are_refused_at_once() -> None:
    clock = Clock()
    gate = admission(clock, max_in_flight=2)
    gate.in_flight = 2
    assert not admitted(gate)
    gate.in_flight = 1
    assert admitted(gate)


def test_the_lag_probe_alone_moves_the_state_between_requests() -> None:
    """A delay above target seen by the probe starts the interval even if no request came."""
    clock = Clock()
    gate = admission(clock)
    gate.lag(0.05)
    clock.now += 0.101
    gate.lag(0.05)
    assert not admitted(gate)


@pytest.mark.parametrize("lag", [0.0, 0.02])
def test_a_delay_at_or_below_target_never_refuses(lag: float) -> None:
    clock = Clock()
    gate = admission(clock)
    for _ in range(100):
        gate.lag(lag)
        clock.now += 0.05
        assert admitted(gate)
