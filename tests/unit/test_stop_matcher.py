"""StopMatcher: streamed text is cut exactly before a stop string, even when the stop spans several pieces."""

from __future__ import annotations

import pytest

from appliance.engines.llamacpp_runtime import StopMatcher


def run(stops: list[str], pieces: list[str]) -> tuple[list[str], bool]:
    """Feed pieces until a stop; returns what was emitted after each feed (and the flush) and whether it stopped."""
    matcher = StopMatcher(stops)
    emitted: list[str] = []
    for piece in pieces:
        out, stopped = matcher.feed(piece)
        emitted.append(out)
        if stopped:
            return emitted, True
    emitted.append(matcher.flush())
    return emitted, False


@pytest.mark.parametrize(("stops", "pieces", "text"), [
    (["END"], ["Hello ", "world", "END", "ignored"], "Hello world"),
    (["END"], ["Hello E", "N", "D and more"], "Hello "),
    (["END"], ["HelloEN", "Dmore"], "Hello"),
    (["\n\n"], ["line one\n", "\nline two"], "line one"),
    (["<|im_end|>"], ["Sure", "<|im", "_", "end|>", "tail"], "Sure"),
    (["END"], ["END"], ""),
    (["stop"], ["a stop in one piece"], "a "),
])
def test_text_is_cut_exactly_before_the_stop(stops: list[str], pieces: list[str], text: str) -> None:
    emitted, stopped = run(stops, pieces)
    assert stopped
    assert "".join(emitted) == text


def test_partial_prefix_is_held_back_then_released() -> None:
    matcher = StopMatcher(["END"])
    assert matcher.feed("Hello E") == ("Hello ", False)  # "E" could start "END": held back
    assert matcher.feed("N") == ("", False)  # "EN" still could
    assert matcher.feed("jOY") == ("ENjOY", False)  # it was not a stop: released in order
    assert matcher.flush() == ""


def test_held_back_prefix_is_released_by_flush_at_the_end() -> None:
    matcher = StopMatcher(["END"])
    assert matcher.feed("the E") == ("the ", False)
    assert matcher.flush() == "E"
    assert matcher.flush() == ""


def test_overlapping_prefix_that_restarts_inside_a_false_start() -> None:
    # "ababc": the first "ab" is not the start of the stop, the second one is
    emitted, stopped = run(["abc"], ["a", "b", "a", "b", "c", "zzz"])
    assert stopped
    assert "".join(emitted) == "ab"


@pytest.mark.parametrize(("stops", "pieces", "text"), [
    (["world", "lo"], ["Hello world"], "Hel"),
    (["lo", "world"], ["Hello world"], "Hel"),
    (["xyz", "o w"], ["Hell", "o", " w", "orld"], "Hell"),
    (["ab", "abcd"], ["x", "abc", "d"], "x"),
])
def test_earliest_stop_wins(stops: list[str], pieces: list[str], text: str) -> None:
    emitted, stopped = run(stops, pieces)
    assert stopped
    assert "".join(emitted) == text


@pytest.mark.parametrize("stops", [[], [""]])
def test_no_stops_is_passthrough(stops: list[str]) -> None:
    matcher = StopMatcher(stops)
    for piece in ["Hello", " ", "END", ""]:
        assert matcher.feed(piece) == (piece, False)
    assert matcher.flush() == ""


def test_text_without_stop_is_emitted_whole_and_in_order() -> None:
    pieces = ["Once ", "upon ", "a ", "time, ", "S", "T", "the ", "end."]
    emitted, stopped = run(["STOP"], pieces)
    assert not stopped
    assert "".join(emitted) == "".join(pieces)
