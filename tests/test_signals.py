"""smollm2/signals.py: under DDP every rank stops at the same step, agreed by an all-reduce at the
steps given as sync only (no collective, no host sync at the others)."""
from smollm2 import signals
from smollm2.signals import StopSignals


def test_should_stop_all_reduces_only_at_the_steps_given_as_sync(monkeypatch):
    reduced = []
    monkeypatch.setattr(signals.dist, "all_reduce", lambda t, op=None: reduced.append(float(t)))
    stop = StopSignals(type("Proc", (), {"world": 2, "device": "cpu", "master": True})())
    stop.received = 15
    assert stop.should_stop(sync=False) is False and reduced == []  # no collective, no host sync
    assert stop.should_stop(sync=True) is True and reduced == [1.0]
