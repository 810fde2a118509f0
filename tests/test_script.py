"""Scripts as people save them."""

from __future__ import annotations

import pytest

from services.text_parser.script import ScriptError, parse_text


def test_a_byte_order_mark_does_not_cost_the_first_line():
    # Editors that save UTF-8 with a byte-order mark put U+FEFF before "Speaker 1:", which the turn pattern
    # would not match: the first line was skipped with a warning.
    plain = parse_text("Speaker 1: Hello there.\r\nSpeaker 2: Hi!\r\n")
    marked = parse_text("\ufeffSpeaker 1: Hello there.\r\nSpeaker 2: Hi!\r\n")
    assert [(t.speaker, t.text) for t in marked.turns] == [(1, "Hello there."), (2, "Hi!")]
    assert marked.turns == plain.turns and marked.shift == plain.shift and marked.warnings == []


def test_a_narration_without_speakers_is_refused_with_the_way_to_write_it():
    with pytest.raises(ScriptError) as err:
        parse_text("Once upon a time there was a model.\n\nIt spoke in segments.\n")
    assert err.value.field == "text"
    assert "no line in the form 'Speaker N: text'" in err.value.reason and "'Speaker 1: '" in err.value.reason


def test_a_byte_order_mark_alone_is_an_empty_script():
    with pytest.raises(ScriptError, match="script is empty"):
        parse_text("\ufeff\n")
