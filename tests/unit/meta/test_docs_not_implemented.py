"""docs/architecture.md names the reference call-graph functions the engine
does not implement, and that list is the code's (core.tcp_h.NOT_IMPLEMENTED):
a doc that claims work the trace does not do, or hides a gap, fails here."""

from __future__ import annotations

import pathlib
import re

from shardstack.core.tcp_h import NOT_IMPLEMENTED

DOC = pathlib.Path(__file__).resolve().parents[3] / "docs" / "architecture.md"


def test_docs_list_the_not_implemented_names():
    text = DOC.read_text()
    m = re.search(r"absent\. Today they are: (.*?)\.\n\n", text, re.S)
    assert m, "docs/architecture.md lost its 'Today they are:' list"
    listed = set(re.findall(r"`([A-Za-z_0-9]+)`", m.group(1)))
    assert listed == set(NOT_IMPLEMENTED), (
        f"only in docs: {sorted(listed - NOT_IMPLEMENTED)}; "
        f"only in core.tcp_h: {sorted(NOT_IMPLEMENTED - listed)}")
