"""Incremental text and stop strings (edlm.text)."""

from edlm.text import TextStream


def test_text_stream_holds_back_partial_characters_and_stop_prefixes():
    utf8 = lambda ids: bytes(ids).decode("utf-8", errors="replace")
    euro = list("€".encode())  # 3 bytes
    t = TextStream(utf8, stop=[])
    assert [t.push([ord("a"), euro[0]]), t.push(euro[1:2]), t.push(euro[2:] + [ord("b")])] == \
        [("a", False), ("", False), ("€b", False)]
    t = TextStream(utf8, stop=["STOP"])
    assert t.push(list(b"go ST")) == ("go ", False)  # "ST" may start the stop string: held
    assert t.push(list(b"OP and more")) == ("", True)  # the stop string spans two blocks
    assert t.sent == "go "
    t = TextStream(utf8, stop=["STOP"])
    assert (t.push(list(b"a ST")), t.push(list(b"ART")), t.flush()) == (("a ", False), ("START", False), "")
    t = TextStream(utf8, stop=["zz"])
    assert (t.push([ord("x"), euro[0]]), t.flush()) == (("x", False), "\ufffd")  # a dangling byte is sent at the end
