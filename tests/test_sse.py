"""The SSE writer follows the spec: every line break starts a new data: field."""

from ortllm.web.streaming import format_event


def test_json_event():
    assert format_event({"token": "a\nb", "done": False}) == 'data: {"token":"a\\nb","done":false}\n\n'


def test_raw_text_with_line_breaks_of_every_kind():
    assert format_event(" upon") == "data:  upon\n\n"
    assert format_event("a\nb") == "data: a\ndata: b\n\n"
    assert format_event("a\r\nb\rc") == "data: a\ndata: b\ndata: c\n\n"
    assert format_event("\n") == "data: \ndata: \n\n"
