"""The derivation rules of feedback/kept.py on recorded cursor positions (the store side is in test_editor_sessions)."""

from feedback.kept import typed_at_cursor

FILE_HEAD = "import math\n\n\ndef area(r):\n    "
FILE_TAIL = "\n\n\ndef main():\n    print(area(2.0))\n"


def test_typed_continuation_after_a_dismissed_suggestion():
    later = FILE_HEAD + "return math.pi * r * r\n    "
    assert typed_at_cursor(FILE_HEAD, FILE_TAIL, later) == "return math.pi * r * r"


def test_half_typed_line_is_left_for_a_later_request():
    assert typed_at_cursor(FILE_HEAD, FILE_TAIL, FILE_HEAD + "return math.pi * r") is None


def test_enter_first_then_a_line():
    prefix = "def area(r):"
    later = prefix + "\n    return 3.14 * r * r\n"
    assert typed_at_cursor(prefix, "\n", later) == "\n    return 3.14 * r * r"


def test_only_as_many_lines_as_the_suggestion_had():
    later = FILE_HEAD + "x = r * r\n    return math.pi * x\n"
    assert typed_at_cursor(FILE_HEAD, FILE_TAIL, later, max_lines=1) == "x = r * r"
    assert typed_at_cursor(FILE_HEAD, FILE_TAIL, later, max_lines=2) == "x = r * r\n    return math.pi * x"


def test_cursor_jump_down_over_existing_text_derives_nothing():
    # No typing: the cursor moved three lines down; the text between was already in the file.
    later = FILE_HEAD + FILE_TAIL[:FILE_TAIL.index("print")]
    assert typed_at_cursor(FILE_HEAD, FILE_TAIL, later) is None
    # ... and then typed something there: still not text written at the earlier cursor.
    assert typed_at_cursor(FILE_HEAD, FILE_TAIL, later + "x = 1\n    ") is None


def test_cursor_jump_up_or_out_of_the_window_derives_nothing():
    assert typed_at_cursor(FILE_HEAD, FILE_TAIL, "import math\n") is None
    # An editor's 20-line window that no longer reaches the earlier cursor's anchor.
    window = "".join(f"x{i} = {i}\n" for i in range(20))
    assert typed_at_cursor(FILE_HEAD, FILE_TAIL, window) is None


def test_typing_that_runs_into_the_existing_code_stops_there():
    later = FILE_HEAD + "return 0\n\n\ndef main():\n    "
    assert typed_at_cursor(FILE_HEAD, "\ndef main():\n    pass\n", later, max_lines=3) == "return 0"


def test_blank_prefix_locates_no_cursor():
    assert typed_at_cursor("   \n", "", "   \nx = 1\n") is None
