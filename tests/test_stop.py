"""Stop strings never leak a partial match into the stream."""

from ortllm.runtime.stop import StopMatcher


def feed_all(matcher, chunks):
    out = [matcher.feed(c) for c in chunks]
    return "".join(out) + matcher.flush(), out


def test_stop_split_across_chunks_is_cut_and_not_leaked():
    text, pieces = feed_all(StopMatcher(["###"]), ["Hello #", "#", "# world"])
    assert text == "Hello "
    assert pieces == ["Hello ", "", ""]  # the '#' was held back, never emitted


def test_partial_match_that_fails_is_released():
    text, pieces = feed_all(StopMatcher(["STOP"]), ["go ST", "ART now"])
    assert text == "go START now"
    assert pieces[0] == "go "


def test_held_text_is_flushed_at_the_end():
    text, _ = feed_all(StopMatcher(["\n4."]), ["1. a\n"])
    assert text == "1. a\n"


def test_earliest_of_several_stops_wins():
    text, _ = feed_all(StopMatcher(["world", "lo w"]), ["hello world"])
    assert text == "hel"


def test_no_stops_passes_through():
    assert feed_all(StopMatcher([]), ["a", "b"])[0] == "ab"
