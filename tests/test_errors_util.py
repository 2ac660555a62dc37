"""dalle_ds/utils/errors.first_line: what a one-line error quotes of another library's exception."""
from dalle_ds.utils.errors import first_line


def test_first_line_skips_blank_lines_and_falls_back_to_the_type():
    assert first_line(RuntimeError("\n  \nPytorchStreamReader failed\nmore advice")) == "PytorchStreamReader failed"
    assert first_line(ValueError("x" * 300), 10) == "x" * 10
    assert first_line(KeyError()) == "KeyError"  # load_artifact's own splitlines()[0] raised IndexError here
