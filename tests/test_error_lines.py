"""One line of what an exception says (issue 28): every one-line error that quotes a library's
exception (a decoder's, torch's, nltk's, an object store's) quotes it through
``core.errors.first_line``: its first non-blank line, else its type name, never empty and never
more than one line, whatever the library put in the message."""
import pytest
from hypothesis import given
from hypothesis import strategies as st

from refinery_pipeline.core.errors import first_line

EXCEPTIONS = st.sampled_from([ValueError, KeyError, RuntimeError, OSError, EOFError])


@given(EXCEPTIONS, st.text(), st.one_of(st.none(), st.integers(1, 300)), st.booleans())
def test_one_non_blank_line_of_the_message_or_the_type_name(kind, message, limit, typed):
    exc = kind(message)
    line = first_line(exc, limit=limit, typed=typed)
    assert len(line.splitlines()) == 1 and line == line.strip()
    said = [text.strip() for text in str(exc).splitlines() if text.strip()]
    if not said:
        assert line == kind.__name__
        return
    quoted = said[0][:limit].rstrip()
    assert line == (f"{kind.__name__}: {quoted}" if typed else quoted)


@pytest.mark.parametrize("exc, line", [
    (RuntimeError("Error(s) in loading state_dict for Net:\n\tMissing key(s): fc.weight"),
     "Error(s) in loading state_dict for Net:"),
    (ValueError("\n  cannot identify image file  \nmore"), "cannot identify image file"),
    (EOFError(), "EOFError"),
    (ValueError(" \n\t\n"), "ValueError"),
])
def test_examples(exc, line):
    assert first_line(exc) == line


def test_typed_names_the_type_and_limit_cuts_the_line_only():
    assert first_line(KeyError("model"), typed=True) == "KeyError: 'model'"
    assert first_line(KeyError(), typed=True) == "KeyError"
    assert first_line(ValueError("x" * 500), limit=200, typed=True) == "ValueError: " + "x" * 200
    assert first_line(ValueError("ab cd"), limit=3) == "ab"  # cut, then stripped again
