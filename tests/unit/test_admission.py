"""The admission controller's decisions, on an injected clock (no event loop, no timing)."""

from __future__ import annotations

import uuid

import pytest

from api.admission import Admission
from shared.errors import Overloaded

TARGET, INTERVAL = 0.2, 0.1


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def gate_on(clock: Clock, *, max_wait_s: float = 1.0, max_in_flight: int = 1000) -> Admission:
    return Admission(target_s=TARGET, interval_s=INTERVAL, max_wait_s=max_wait_s,
                     max_in_flight=max_in_flight, clock=clock)


def admitted(gate: Admission) -> bool:
    try:
        gate.admit()
    except Overloaded as exc:
        assert exc.status == 529
        assert exc.headers["retry-after"] == "1"
        return False
    return True


def serve(gate: Admission, clock: Clock, *, rate: float, seconds: float,
          waiting: int) -> list[uuid.UUID]:
    """Workers answering `rate` requests/s, one after the other, for `seconds`; then
    `waiting` requests queue up."""
    for _ in range(int(rate * seconds)):
        job = uuid.uuid4()
        gate.published(job)
        clock.now += 1 / rate
        gate.answered(job)
    queued = [uuid.uuid4() for _ in range(waiting)]
    for job in queued:
        gate.published(job)
    return queued


def test_an_idle_gate_admits() -> None:
    clock = Clock()
    gate = gate_on(clock)
    assert all(admitted(gate) for _ in range(1000))
    assert gate.refused == 0


def test_the_delay_is_the_queue_over_the_answer_rate() -> None:
    clock = Clock()
    gate = gate_on(clock)
    queued = serve(gate, clock, rate=500, seconds=5, waiting=50)
    assert gate.delay(clock.now) == pytest.approx(50 / 500, rel=0.05)
    for job in queued:
        gate.answered(job)
    assert gate.delay(clock.now) == 0


def test_a_queue_under_the_target_is_admitted_however_long_it_stands() -> None:
    """A closed-loop client at saturation: its connections bound the queue."""
    clock = Clock()
    gate = gate_on(clock)
    queued = serve(gate, clock, rate=500, seconds=5, waiting=60)  # 120 ms
    for _ in range(2000):  # each answer brings the next request from its connection
        clock.now += 1 / 500
        gate.answered(queued.pop(0))
        queued.append(uuid.uuid4())
        gate.published(queued[-1])
        assert admitted(gate)


def test_a_queue_above_the_target_for_less_than_an_interval_is_a_burst() -> None:
    clock = Clock()
    gate = gate_on(clock)
    queued = serve(gate, clock, rate=500, seconds=5, waiting=150)  # 300 ms
    assert admitted(gate)
    clock.now += INTERVAL * 0.9
    assert admitted(gate)
    for job in queued:
        gate.answered(job)
    assert admitted(gate)


def test_a_queue_that_stays_above_the_target_is_refused_until_it_falls() -> None:
    clock = Clock()
    gate = gate_on(clock)
    queued = serve(gate, clock, rate=500, seconds=5, waiting=150)
    assert admitted(gate)
    clock.now += INTERVAL * 1.01
    assert not admitted(gate)
    assert not admitted(gate)
    for job in queued[:100]:
        gate.answered(job)
    assert admitted(gate)
    assert gate.refused == 2


def test_right_after_a_refusal_spell_a_queue_that_stands_again_gets_no_grace() -> None:
    clock = Clock()
    gate = gate_on(clock)
    queued = serve(gate, clock, rate=500, seconds=5, waiting=150)
    assert admitted(gate)
    clock.now += INTERVAL * 1.01
    assert not admitted(gate)
    for job in queued:
        gate.answered(job)
    assert admitted(gate)
    clock.now += INTERVAL / 10
    again = serve(gate, clock, rate=500, seconds=0.01, waiting=400)
    assert not admitted(gate)  # within an interval of the last refusal
    for job in again:
        gate.answered(job)
    clock.now += 10
    serve(gate, clock, rate=500, seconds=0.01, waiting=400)
    assert admitted(gate)  # long after: a new burst gets its grace again


def test_the_answer_rate_is_kept_through_an_idle_spell() -> None:
    """A burst after a quiet minute is measured against what the workers managed while
    busy, not mistaken for a queue because few answers came lately."""
    clock = Clock()
    gate = gate_on(clock)
    serve(gate, clock, rate=500, seconds=5, waiting=0)
    clock.now += 60
    for _ in range(64):
        gate.published(uuid.uuid4())
    assert gate.delay(clock.now) == pytest.approx(64 / 500, rel=0.05)


def test_before_any_answer_the_delay_is_the_oldest_wait() -> None:
    clock = Clock()
    gate = gate_on(clock)
    gate.published(uuid.uuid4())
    clock.now += 0.5
    gate.published(uuid.uuid4())
    assert gate.delay(clock.now) == pytest.approx(0.5)


def test_a_request_waiting_past_the_wait_refuses_at_once() -> None:
    clock = Clock()
    gate = gate_on(clock, max_wait_s=1.0)
    job = uuid.uuid4()
    gate.published(job)
    clock.now += 1.01
    assert not admitted(gate)
    gate.settled(job)
    assert admitted(gate)


def test_past_the_in_flight_cap_requests_are_refused_at_once() -> None:
    clock = Clock()
    gate = gate_on(clock, max_in_flight=2)
    gate.in_flight = 2
    assert not admitted(gate)
    gate.in_flight = 1
    assert admitted(gate)


def test_an_event_loop_lag_above_the_target_for_an_interval_refuses() -> None:
    clock = Clock()
    gate = gate_on(clock)
    gate.lag(TARGET * 2)
    assert admitted(gate)
    clock.now += INTERVAL * 1.01
    gate.lag(TARGET * 2)
    assert not admitted(gate)
    gate.lag(TARGET / 2)
    assert admitted(gate)


def test_a_queue_of_at_most_the_minimum_is_never_refused_on_its_delay() -> None:
    """A handful of requests on slow workers (a shared machine's slow moment) stand above
    the target, but refusing them would relieve nothing."""
    clock = Clock()
    gate = Admission(target_s=TARGET, interval_s=INTERVAL, max_wait_s=10.0,
                     max_in_flight=1000, min_queue=16, clock=clock)
    serve(gate, clock, rate=20, seconds=5, waiting=16)  # 16 waiting: 0.8 s at 20/s
    assert gate.delay(clock.now) > TARGET
    for _ in range(5):
        assert admitted(gate)
        clock.now += INTERVAL
    gate.published(uuid.uuid4())  # the 17th: now the delay rule applies
    assert admitted(gate)  # it has not stood for an interval yet
    clock.now += INTERVAL * 1.01
    assert not admitted(gate)


def test_the_event_loop_lag_has_a_target_of_its_own() -> None:
    clock = Clock()
    gate = Admission(target_s=0.02, interval_s=INTERVAL, max_wait_s=1.0, max_in_flight=1000,
                     lag_target_s=0.2, clock=clock)
    for _ in range(5):  # above the queue's target, under the lag's: a busy loop, admitted
        gate.lag(0.1)
        assert admitted(gate)
        clock.now += INTERVAL
    gate.lag(0.3)
    assert admitted(gate)
    clock.now += INTERVAL * 1.01
    gate.lag(0.3)
    assert not admitted(gate)
