"""read_ahead: the next source page is read by a background thread while h runs on this one."""

from __future__ import annotations

import threading

import pytest

from fct_assets.upgrade.backfill import read_ahead


def test_items_come_in_order_whatever_the_depth():
    for depth in (0, 1, 2, 5):
        assert list(read_ahead(iter(range(23)), depth)) == list(range(23))
    assert list(read_ahead(iter([]), 2)) == []


def test_an_error_of_the_producer_is_raised_where_it_happened():
    def pages():
        yield from (0, 1, 2)
        raise ValueError("gallery_store: page 3 unreadable")

    got = []
    with pytest.raises(ValueError, match="page 3 unreadable"):
        for item in read_ahead(pages(), 2):
            got.append(item)
    assert got == [0, 1, 2]  # every page before the failure was handed over


def test_a_consumer_that_stops_early_stops_the_producer():
    produced = []

    def pages():
        for i in range(1000):
            produced.append(i)
            yield i

    before = {t.ident for t in threading.enumerate()}
    reader = read_ahead(pages(), 2)
    assert next(reader) == 0
    reader.close()  # the consumer gives up (an error of its own, a closed generator)
    leftover = [t for t in threading.enumerate() if t.ident not in before and t.is_alive()]
    assert leftover == []
    # The producer ran at most the queue's depth (+ the item in hand) ahead, never to the end.
    assert len(produced) <= 1 + 2 + 1
