"""Lexer and parser of the packetdrill script format.

A script is a list of events, one per line (a line may continue while a
bracket is open).  Each event starts with a time:

  ``0.1``       absolute, seconds from the start
  ``+0.1``      relative to the previous event
  ``0.1~0.3``   a range (absolute or relative), ``*`` any time
  ``+0...0.2``  a system call that blocks and returns at the second time

and is then one of: a packet (``< S 0:0(0) win 1000 <mss 1460>`` injected,
``> S. 0:0(0) ack 1 ...`` expected), a system call (``write(4, ..., 10) =
10``), a shell command in backquotes, or a ``%{ python }%`` block.  Lines
``--name=value`` before the first event set options.  Comments are ``//``
to the end of the line and ``/* ... */``.

Anything outside what this module understands raises ``Unsupported`` with
the line number, so the runner reports ``skip`` instead of guessing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any


class Unsupported(Exception):
    """A construct the runner cannot execute: the script is skipped, never passed."""

    def __init__(self, line: int, why: str) -> None:
        super().__init__(why)
        self.line = line
        self.why = why


@dataclass(slots=True)
class Time:
    kind: str  # "abs", "rel", "any"
    start: float = 0.0
    end: float | None = None  # a range's end (same kind as start)


@dataclass(slots=True)
class Sym:
    """A symbolic constant or an OR of several (``O_RDWR|O_NONBLOCK``)."""

    names: tuple[str, ...]


@dataclass(slots=True)
class Syscall:
    name: str
    args: list[Any]
    ret: Any  # int, Sym, or Ellipsis
    errno: str | None = None


@dataclass(slots=True)
class TcpOption:
    kind: str  # mss wscale sackOK nop eol TS sack
    value: Any = None  # mss/wscale: int; TS: (val, ecr); sack: [(l, r), ...]


@dataclass(slots=True)
class PacketSpec:
    direction: str  # "<" inbound (injected), ">" outbound (expected)
    flags: str  # packetdrill letters, e.g. "S." "P." "F." "R" "."
    seq: int
    end: int
    length: int
    ack: int | None = None
    win: int | None = None
    urg: int | None = None
    options: list[TcpOption] | None = None  # None: "<...>", do not check
    ecn: str | None = None  # noecn ect0 ect1 ect01 ce, or None: not stated
    text: str = ""
    sport: int | None = None  # "SPORT>DPORT" before the flags: a flow of its own
    dport: int | None = None


@dataclass(slots=True)
class IcmpSpec:
    """An ICMP error the peer's side injects, quoting one of the stack's segments."""

    direction: str
    itype: str  # unreachable, time_exceeded, ...
    code: str | None
    mtu: int | None
    seq: int = 0  # the quoted segment, relative to the stack's ISN
    length: int = 0
    text: str = ""


@dataclass(slots=True)
class Event:
    line: int
    time: Time
    kind: str  # "packet" "syscall" "shell" "code"
    text: str
    body: Any = None  # PacketSpec | Syscall | str (shell / code)
    end: float | None = None  # blocking syscall: its return time
    end_rel: bool = False


@dataclass(slots=True)
class Script:
    path: str
    events: list[Event] = field(default_factory=list)
    options: dict[str, str] = field(default_factory=dict)
    option_lines: dict[str, int] = field(default_factory=dict)


# -- lexing --------------------------------------------------------------------------------

_TOKEN = re.compile(r"""
    (?P<ws>\s+)
  | (?P<ellipsis>\.\.\.)
  | (?P<num>0[xX][0-9a-fA-F]+|\d+\.\d*|\.\d+|\d+)
  | (?P<str>"(?:[^"\\]|\\.)*")
  | (?P<id>[A-Za-z_][A-Za-z_0-9]*)
  | (?P<punct>[()\[\]{},=<>:|~+\-*.!&/;@%^])
""", re.VERBOSE)


def tokenize(text: str, line: int) -> list[tuple[str, str]]:
    out = []
    pos = 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            raise Unsupported(line, f"cannot read {text[pos:pos + 20]!r}")
        pos = m.end()
        if m.lastgroup != "ws":
            out.append((m.lastgroup, m.group()))
    return out


def _strip(text: str) -> tuple[str, list[tuple[str, str]]]:
    """Remove comments; replace backquoted shell and %{ }% code by @N placeholders.

    Line breaks are kept so line numbers stay right.
    """
    out: list[str] = []
    blocks: list[tuple[str, str]] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("%{", i):
            j = text.find("}%", i + 2)
            j = n if j < 0 else j
            blocks.append(("code", text[i + 2:j]))
            out.append(f"@{len(blocks) - 1}" + "\n" * text.count("\n", i, j))
            i = j + 2
        elif c == "`":
            j = text.find("`", i + 1)
            j = n if j < 0 else j
            blocks.append(("shell", text[i + 1:j]))
            out.append(f"@{len(blocks) - 1}" + "\n" * text.count("\n", i, j))
            i = j + 1
        elif text.startswith("//", i):
            j = text.find("\n", i)
            i = n if j < 0 else j
        elif text.startswith("/*", i):
            j = text.find("*/", i + 2)
            j = n if j < 0 else j
            out.append("\n" * text.count("\n", i, j))
            i = j + 2
        elif c == '"':
            m = re.compile(r'"(?:[^"\\]|\\.)*"').match(text, i)
            s = m.group() if m else c
            out.append(s)
            i += len(s)
        else:
            out.append(c)
            i += 1
    return "".join(out), blocks


_NUM = r"(?:\d+\.?\d*|\.\d+)"
_TIME = re.compile(rf"^\s*(?P<t>\*|(?P<p1>\+)?(?P<a>{_NUM})(?:~(?P<p2>\+)?(?P<b>{_NUM}))?)"
                   rf"(?:\s*\.\.\.\s*(?P<p3>\+)?(?P<e>{_NUM}))?(?=\s|$)")
_OPTION = re.compile(r"^\s*--([A-Za-z_0-9]+)(?:=(\S*))?\s*$")


def _balance(s: str) -> int:
    s = re.sub(r'"(?:[^"\\]|\\.)*"', "", s)
    return sum(s.count(c) for c in "([{") - sum(s.count(c) for c in ")]}")


def parse_script(text: str, path: str = "<script>") -> Script:
    clean, blocks = _strip(text)
    script = Script(path)
    pending: list[tuple[int, str]] = []  # (first line, text) of events
    for lineno, raw in enumerate(clean.split("\n"), 1):
        if not raw.strip():
            continue
        if pending and _balance(pending[-1][1]) > 0:
            pending[-1] = (pending[-1][0], pending[-1][1] + " " + raw.strip())
            continue
        m = _OPTION.match(raw)
        if m and not pending:
            script.options[m.group(1)] = m.group(2) or ""
            script.option_lines[m.group(1)] = lineno
            continue
        if _TIME.match(raw):
            pending.append((lineno, raw.strip()))
        elif re.match(r"^\s*@\d+\s*$", raw):  # a shell line without a time: runs then
            pending.append((lineno, "+0 " + raw.strip()))
        elif pending:
            pending[-1] = (pending[-1][0], pending[-1][1] + " " + raw.strip())
        else:
            raise Unsupported(lineno, f"not an event: {raw.strip()[:60]!r}")
    for lineno, body in pending:
        script.events.append(_parse_event(lineno, body, blocks))
    return script


def _parse_event(line: int, text: str, blocks: list[tuple[str, str]]) -> Event:
    m = _TIME.match(text)
    assert m is not None
    if m.group("t") == "*":
        t = Time("any")
    else:
        kind = "rel" if m.group("p1") else "abs"
        end = None
        if m.group("b") is not None:
            end = float(m.group("b"))
        t = Time(kind, float(m.group("a")), end)
    rest = text[m.end():].strip()
    ev = Event(line, t, "", rest)
    if m.group("e") is not None:
        ev.end = float(m.group("e"))
        ev.end_rel = bool(m.group("p3")) or t.kind == "rel"
    if rest.startswith("@"):
        idx = int(re.match(r"@(\d+)", rest).group(1))
        ev.kind, ev.body = blocks[idx]
        return ev
    if rest[:1] in "<>":
        ev.kind = "packet"
        ev.body = parse_packet(line, rest)
        return ev
    if re.match(r"[A-Za-z_][A-Za-z_0-9]*\s*\(", rest):
        ev.kind = "syscall"
        ev.body = parse_syscall(line, rest)
        return ev
    raise Unsupported(line, f"unknown event {rest[:50]!r}")


# -- syscalls ------------------------------------------------------------------------------

class _Tokens:
    def __init__(self, toks: list[tuple[str, str]], line: int) -> None:
        self.t = toks
        self.i = 0
        self.line = line

    def peek(self, k: int = 0) -> tuple[str, str]:
        j = self.i + k
        return self.t[j] if j < len(self.t) else ("eof", "")

    def next(self) -> tuple[str, str]:
        tok = self.peek()
        self.i += 1
        return tok

    def expect(self, value: str) -> None:
        tok = self.next()
        if tok[1] != value:
            raise Unsupported(self.line, f"expected {value!r}, found {tok[1]!r}")

    def at(self, value: str) -> bool:
        return self.peek()[1] == value

    def done(self) -> bool:
        return self.i >= len(self.t)


def _num(s: str) -> int | float:
    if s.lower().startswith("0x"):
        return int(s, 16)
    if "." in s:
        return float(s)
    return int(s)


def _expr(tk: _Tokens) -> Any:
    kind, val = tk.peek()
    if kind == "ellipsis":
        tk.next()
        return ...
    if val == "-" and tk.peek(1)[0] == "num":
        tk.next()
        return -_num(tk.next()[1])
    if kind == "num":
        tk.next()
        v = _num(val)
        if tk.at("|"):  # 0x1|FOO
            names = [str(v)]
            while tk.at("|"):
                tk.next()
                names.append(tk.next()[1])
            return Sym(tuple(names))
        return v
    if kind == "str":
        tk.next()
        return bytes(val[1:-1], "utf-8").decode("unicode_escape").encode("latin-1")
    if kind == "id":
        tk.next()
        if tk.at("("):  # htons(8080), inet_addr("1.2.3.4"), sockaddr helpers
            tk.next()
            inner = [] if tk.at(")") else _exprs(tk, ")")
            tk.expect(")")
            return ("call", val, inner)
        if tk.at("="):  # a named field inside a struct without braces
            return ("field", val)
        names = [val]
        while tk.at("|"):
            tk.next()
            names.append(tk.next()[1])
        return Sym(tuple(names))
    if val == "[":
        tk.next()
        items = [] if tk.at("]") else _exprs(tk, "]")
        tk.expect("]")
        return items
    if val == "{":
        tk.next()
        fields: dict[str, Any] = {}
        while not tk.at("}"):
            if tk.peek()[0] == "id" and tk.peek(1)[1] in ("=", "("):
                k = tk.next()[1]
                if tk.at("("):  # msg_iov(1)=..., msg_name(...)=...
                    _skip_parens(tk)
                tk.expect("=")
                fields[k] = _expr(tk)
            else:
                fields[f"_{len(fields)}"] = _expr(tk)
            if tk.at(","):
                tk.next()
            elif not tk.at("}"):
                raise Unsupported(tk.line, f"cannot read struct near {tk.peek()[1]!r}")
        tk.next()
        return fields
    if val == "&":
        tk.next()
        return _expr(tk)
    raise Unsupported(tk.line, f"cannot read argument {val!r}")


def _exprs(tk: _Tokens, close: str) -> list[Any]:
    items = [_expr(tk)]
    while tk.at(","):
        tk.next()
        items.append(_expr(tk))
    if not tk.at(close):
        raise Unsupported(tk.line, f"expected {close!r}, found {tk.peek()[1]!r}")
    return items


def _skip_parens(tk: _Tokens) -> None:
    depth = 0
    while not tk.done():
        v = tk.next()[1]
        depth += (v == "(") - (v == ")")
        if depth == 0:
            break


def parse_syscall(line: int, text: str) -> Syscall:
    tk = _Tokens(tokenize(text, line), line)
    name = tk.next()[1]
    tk.expect("(")
    args = [] if tk.at(")") else _exprs(tk, ")")
    tk.expect(")")
    tk.expect("=")
    ret = _expr(tk)
    errno = None
    if tk.at("(") and ret is not ...:  # = 0x2 (flags O_RDWR): a comment on the value
        _skip_parens(tk)
    if tk.peek()[0] == "id":
        errno = tk.next()[1]
        if tk.at("("):  # (human readable text)
            _skip_parens(tk)
    if not tk.done():
        raise Unsupported(line, f"cannot read after the result: {tk.peek()[1]!r}")
    return Syscall(name, args, ret, errno)


# -- packets -------------------------------------------------------------------------------

_FLAG_CHARS = set("FSRP.EWUA")


def parse_packet(line: int, text: str) -> PacketSpec:
    tk = _Tokens(tokenize(text, line), line)
    direction = tk.next()[1]
    ecn = None
    if tk.at("["):
        tk.next()
        ecn = tk.next()[1].lower()
        tk.expect("]")
        if ecn not in ("noecn", "ect0", "ect1", "ect01", "ce"):
            raise Unsupported(line, f"IP field [{ecn}]")
    ports = None
    if tk.peek()[0] == "num" and tk.peek(1)[1] == ">" and tk.peek(2)[0] == "num":
        ports = (int(_num(tk.next()[1])), int(_num((tk.next(), tk.next())[1][1])))
    kind, val = tk.peek()
    if kind == "id" and val == "icmp":
        return _icmp(tk, direction, text)
    if kind == "id" and val.lower() in ("udp", "icmp", "gre", "mpls", "psp", "udplite"):
        raise Unsupported(line, f"{val} packets (the engine speaks TCP over IPv4 here)")
    if val == "(":
        raise Unsupported(line, "IP header fields in a packet line")
    flags = ""
    if tk.at("-"):  # no flags at all
        tk.next()
        flags = "-"
    while tk.peek()[0] in ("id", "punct") and tk.peek()[1] != "<" \
            and set(tk.peek()[1]) <= _FLAG_CHARS:
        flags += tk.next()[1]
    if not flags:
        raise Unsupported(line, f"packet without TCP flags: {text[:40]!r}")
    if tk.peek()[0] != "num":
        raise Unsupported(line, f"packet without sequence numbers: {text[:40]!r}")
    seq = int(_num(tk.next()[1]))
    tk.expect(":")
    end = int(_num(tk.next()[1]))
    tk.expect("(")
    length = int(_num(tk.next()[1]))
    tk.expect(")")
    spec = PacketSpec(direction, flags, seq, end, length, ecn=ecn, options=[], text=text)
    if ports:
        spec.sport, spec.dport = ports
    while not tk.done():
        kind, val = tk.next()
        if val in ("ack", "win", "urg") and tk.peek()[0] == "num":
            setattr(spec, val, int(_num(tk.next()[1])))
        elif val == "<":
            spec.options = _options(tk)
        else:
            raise Unsupported(line, f"packet field {val!r}")
    return spec


ICMP_TYPES = ("unreachable", "time_exceeded", "parameter_problem", "source_quench")


def _icmp(tk: _Tokens, direction: str, text: str) -> IcmpSpec:
    tk.next()
    if direction != "<":
        raise Unsupported(tk.line, "outbound ICMP (the engine's ICMP is not matched)")
    itype = tk.next()[1]
    if itype not in ICMP_TYPES:
        raise Unsupported(tk.line, f"ICMP {itype}")
    spec = IcmpSpec(direction, itype, None, None, text=text)
    if tk.peek()[0] == "id" and tk.peek()[1] not in ("mtu", "id"):
        spec.code = tk.next()[1]
    while not tk.done():
        kind, val = tk.next()
        if val == "mtu" and tk.peek()[0] == "num":
            spec.mtu = int(_num(tk.next()[1]))
        elif val == "id" and tk.peek()[0] == "num":
            tk.next()
        elif val == "[":
            if tk.peek()[0] != "num":
                raise Unsupported(tk.line, f"ICMP quoting {tk.peek()[1]}")
            spec.seq = int(_num(tk.next()[1]))
            tk.expect(":")
            tk.next()
            tk.expect("(")
            spec.length = int(_num(tk.next()[1]))
            tk.expect(")")
            tk.expect("]")
        else:
            raise Unsupported(tk.line, f"ICMP field {val!r}")
    return spec


def _options(tk: _Tokens) -> list[TcpOption] | None:
    if tk.at("...") or tk.peek()[0] == "ellipsis":
        tk.next()
        tk.expect(">")
        return None
    opts: list[TcpOption] = []
    while True:
        kind, val = tk.next()
        if val in ("nop", "eol", "sackOK"):
            opts.append(TcpOption(val))
        elif val in ("mss", "wscale"):
            opts.append(TcpOption(val, int(_num(tk.next()[1]))))
        elif val == "TS":
            tk.expect("val")
            tsval = int(_num(tk.next()[1]))
            tk.expect("ecr")
            opts.append(TcpOption("TS", (tsval, int(_num(tk.next()[1])))))
        elif val == "sack":
            blocks = []
            while tk.peek()[0] == "num":
                left = int(_num(tk.next()[1]))
                tk.expect(":")
                blocks.append((left, int(_num(tk.next()[1]))))
            opts.append(TcpOption("sack", blocks))
        else:
            raise Unsupported(tk.line, f"TCP option {val!r}")
        sep = tk.next()[1]
        if sep == ">":
            return opts
        if sep != ",":
            raise Unsupported(tk.line, f"TCP option list near {sep!r}")
