"""The packetdrill runner rejects wrong behaviour and says what it saw.

Each test runs a small script against the real engine (virtual time).  The
scripts that must fail state one thing the engine does differently (window,
flags, option order, errno, timing ...): the runner must fail them at that
line, with the expected and the actual packet side by side.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from shardstack.packetdrill import run_text
from shardstack.packetdrill.script import Unsupported, parse_script

LISTEN = """\
0   socket(..., SOCK_STREAM, IPPROTO_TCP) = 3
+0  setsockopt(3, SOL_SOCKET, SO_REUSEADDR, [1], 4) = 0
+0  bind(3, ..., ...) = 0
+0  listen(3, 1) = 0
"""
SYN = "+0  < S 0:0(0) win 65535 <mss 1000,sackOK,nop,nop,nop,wscale 7>\n"
SYNACK = "+0  > S. 0:0(0) ack 1 <mss 1460,nop,nop,sackOK,nop,wscale 7>\n"
ESTABLISH = LISTEN + SYN + SYNACK + """\
+.1 < . 1:1(0) ack 1 win 514
+0  accept(3, ..., ...) = 4
"""


def run(text: str):
    return run_text(text, "t.pkt")


def test_passive_open_and_data_pass():
    r = run(ESTABLISH + "+0 write(4, ..., 1000) = 1000\n+0 > P. 1:1001(1000) ack 1\n"
            "+.1 < . 1:1(0) ack 1001 win 514\n")
    assert (r.status, r.reason) == ("pass", "")


def test_wrong_window_fails_with_both_packets():
    r = run(LISTEN + SYN + "+0 > S. 0:0(0) ack 1 win 1234 <mss 1460,nop,nop,sackOK,nop,wscale 7>\n")
    assert r.status == "fail" and r.line == 6
    assert "window 1234 vs 64240" in r.reason
    assert "expected 'S. 0:0(0) ack 1 win 1234" in r.reason
    assert "got 'S. 0:0(0) ack 1 win 64240 <mss 1460,nop,nop,sackOK,nop,wscale 7>'" in r.reason


def test_wrong_flags_fail():
    r = run(LISTEN + SYN + "+0 > S 0:0(0) <mss 1460,nop,nop,sackOK,nop,wscale 7>\n")
    assert r.status == "fail" and r.line == 6
    assert "flags S vs S." in r.reason


def test_wrong_option_order_fails():
    r = run(LISTEN + SYN + "+0 > S. 0:0(0) ack 1 <mss 1460,sackOK,nop,nop,nop,wscale 7>\n")
    assert r.status == "fail" and r.line == 6
    assert "TCP options" in r.reason and "got 'S. 0:0(0) ack 1" in r.reason


def test_wrong_option_value_fails():
    r = run(LISTEN + SYN + "+0 > S. 0:0(0) ack 1 <mss 1400,nop,nop,sackOK,nop,wscale 7>\n")
    assert r.status == "fail" and "mss" in r.reason


def test_options_ellipsis_not_checked():
    r = run(LISTEN + SYN + "+0 > S. 0:0(0) ack 1 <...>\n")
    assert r.status == "pass", r.reason


def test_wrong_errno_fails():
    r = run("0 socket(..., SOCK_STREAM, IPPROTO_TCP) = 3\n"
            "+0 bind(3, ..., ...) = 0\n"
            "+0 bind(3, ..., ...) = -1 EADDRINUSE (Address already in use)\n")
    assert r.status == "fail" and r.line == 3
    assert "EINVAL" in r.reason and "EADDRINUSE" in r.reason


def test_right_errno_passes():
    r = run("0 socket(..., SOCK_STREAM, IPPROTO_TCP) = 3\n+0 bind(3, ..., ...) = 0\n"
            "+0 bind(3, ..., ...) = -1 EINVAL (Invalid argument)\n")
    assert r.status == "pass", r.reason


def test_wrong_return_value_fails():
    r = run(ESTABLISH + "+0 write(4, ..., 1000) = 999\n")
    assert r.status == "fail" and "returned 1000; expected 999" in r.reason


def test_early_packet_fails_timing():
    # The SYN-ACK leaves at once; a script expecting it 50 ms later is wrong.
    r = run(LISTEN + SYN + "+.05 > S. 0:0(0) ack 1 <mss 1460,nop,nop,sackOK,nop,wscale 7>\n")
    assert r.status == "fail" and r.line == 6
    assert "timing error" in r.reason and "0.050000" in r.reason and "0.000000" in r.reason


@pytest.mark.parametrize("when,status", [("+1", "pass"), ("+1.1", "pass"), ("+1.004", "pass"),
                                         ("+1.2", "fail"), ("+.8", "fail")])
def test_tolerance_is_max_4ms_or_12_5_percent(when, status):
    # The SYN-ACK is retransmitted 1 s after the first: 12.5 % of 1.1 s is 137 ms,
    # of 1.2 s 150 ms (1.0 is 200 ms off); 0.8 s is early by more than 100 ms.
    r = run(LISTEN + SYN + SYNACK + f"{when} > S. 0:0(0) ack 1 <mss 1460,nop,nop,sackOK,nop,wscale 7>\n")
    assert r.status == status, r.reason


def test_missing_packet_fails():
    r = run(ESTABLISH + "+0 > P. 1:1001(1000) ack 1\n")
    assert r.status == "fail" and "nothing was sent" in r.reason


def test_glued_segments_match_one_line():
    # Four MSS-size segments (1000 bytes each) against one line, as packetdrill's
    # non-strict mode; the wrong total still fails.
    ok = run(ESTABLISH + "+0 write(4, ..., 4000) = 4000\n+0 > P. 1:4001(4000) ack 1\n")
    assert ok.status == "pass", ok.reason
    bad = run(ESTABLISH + "+0 write(4, ..., 4000) = 4000\n+0 > P. 1:3501(3500) ack 1\n")
    assert bad.status == "fail" and "payload length 3500 vs 4000" in bad.reason


def test_blocking_accept_returns_when_handshake_completes():
    text = LISTEN + "+0...0.100 accept(3, ..., ...) = 4\n" + SYN + SYNACK + \
        "+.1 < . 1:1(0) ack 1 win 514\n"
    assert run(text).status == "pass"
    early = run(text.replace("+0...0.100", "+0...0.050"))
    assert early.status == "fail" and "system call return" in early.reason


def test_blocking_call_that_never_returns_fails():
    r = run(ESTABLISH + "+0...0.5 read(4, ..., 1000) = 10\n")
    assert r.status == "fail" and "never returned" in r.reason


def test_ts_ecr_rewritten_to_live_tsval():
    # The script's ecr 100 is the SYN-ACK's TSval as the script wrote it; the
    # engine's real TSval differs, and an unmapped ecr would fail PAWS/RTT logic.
    text = LISTEN + """\
+0 < S 0:0(0) win 65535 <mss 1000,sackOK,TS val 100 ecr 0,nop,wscale 7>
+0 > S. 0:0(0) ack 1 <mss 1460,sackOK,TS val 100 ecr 100,nop,wscale 7>
+.1 < . 1:1(0) ack 1 win 514 <nop,nop,TS val 200 ecr 100>
+0 accept(3, ..., ...) = 4
+0 %{ assert tcpi_rtt > 90000, tcpi_rtt }%
"""
    r = run(text)
    assert r.status == "pass", r.reason


def test_tcpi_assertion_failure_fails():
    r = run(ESTABLISH + "+0 %{ assert tcpi_snd_cwnd == 3, tcpi_snd_cwnd }%\n")
    assert r.status == "fail" and r.line == 9
    assert "tcpi_snd_cwnd=10" in r.reason


def test_tcpi_fields_seen_at_their_time():
    r = run(ESTABLISH + "+0 %{ assert tcpi_state == TCP_ESTABLISHED }%\n+0 close(4) = 0\n"
            "+0 > F. 1:1(0) ack 1\n")
    assert r.status == "pass", r.reason


def test_unsupported_line_skips_with_line_number():
    r = run(ESTABLISH + "+0 epoll_create(1) = 5\n")
    assert (r.status, r.line) == ("skip", 9)
    assert "epoll_create" in r.reason
    r = run(ESTABLISH + "+0 < udp (10)\n")
    assert r.status == "skip" and "udp" in r.reason


def test_unknown_sysctl_skips():
    r = run("0 `sysctl -q net.ipv4.tcp_no_such_thing=1`\n" + LISTEN)
    assert r.status == "skip" and r.line == 1


def test_defaults_script_is_read(tmp_path):
    (tmp_path / "common").mkdir()
    (tmp_path / "common" / "defaults.sh").write_text(
        'sysctl -q net.ipv4.tcp_rmem="4096 87380 $((15*1024*1024))"\n'
        "sysctl -q net.ipv4.tcp_timestamps=1\n")
    (tmp_path / "s").mkdir()
    script = tmp_path / "s" / "a.pkt"
    script.write_text("`../common/defaults.sh`\n" + LISTEN + SYN +
                      "+0 > S. 0:0(0) ack 1 <mss 1460,nop,nop,sackOK,nop,wscale 8>\n")
    from shardstack.packetdrill import run_file
    r = run_file(str(script))
    assert r.status == "pass", r.reason  # a 15 MiB buffer: window scale 8


def test_parser_times_and_structs():
    s = parse_script("""--tolerance_usecs=10000
0.1 socket(..., SOCK_STREAM, IPPROTO_TCP) = 3
+.2~+.3 > . 1:1(0) ack 1
* > . 1:1(0) ack 1
+.1...0.5 poll([{fd=3, events=POLLIN, revents=0}], 1, 100) = 0
+0 setsockopt(3, SOL_SOCKET, SO_LINGER, {onoff=1, linger=0}, 8) = 0
+0 fcntl(3, F_GETFL) = 0x2 (flags O_RDWR)
""")
    ev = s.events
    assert s.options == {"tolerance_usecs": "10000"}
    assert (ev[0].time.kind, ev[0].time.start) == ("abs", 0.1)
    assert (ev[1].time.kind, ev[1].time.start, ev[1].time.end) == ("rel", 0.2, 0.3)
    assert ev[2].time.kind == "any"
    assert (ev[3].end, ev[3].end_rel) == (0.5, True)
    assert ev[3].body.args[0][0]["fd"] == 3
    assert ev[4].body.args[3] == {"onoff": 1, "linger": 0}
    assert ev[5].body.ret == 2


def test_parser_rejects_garbage_with_line():
    with pytest.raises(Unsupported) as e:
        parse_script("0 socket(..., SOCK_STREAM, IPPROTO_TCP) = 3\n+0 > ? 1:1(0)\n")
    assert e.value.line == 2


def test_cli_json_and_exit_status(tmp_path):
    good = tmp_path / "good.pkt"
    good.write_text(LISTEN + SYN + SYNACK)
    bad = tmp_path / "bad.pkt"
    bad.write_text(LISTEN + SYN + "+0 > S. 0:0(0) ack 1 win 1 <...>\n")
    out = subprocess.run([sys.executable, "-m", "shardstack", "packetdrill", "--json",
                          str(good), str(bad)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    rows = json.loads(out.stdout)
    assert [r["status"] for r in rows] == ["pass", "fail"]
    assert set(rows[1]) == {"script", "status", "line", "reason", "seconds"}
    assert rows[1]["line"] == 6
    ok = subprocess.run([sys.executable, "-m", "shardstack", "packetdrill", str(good)],
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and ok.stdout.startswith("pass ")


def test_strict_segments_turns_gluing_off():
    text = ESTABLISH + "+0 write(4, ..., 2000) = 2000\n+0 > P. 1:2001(2000) ack 1\n"
    assert run(text).status == "pass"
    r = run("--strict_segments\n" + text)
    assert r.status == "fail" and "got '. 1:1001(1000) ack 1" in r.reason


@pytest.mark.parametrize("tsval,status", [(1200, "pass"), (700, "fail")])
def test_ts_tick_checks_outbound_tsval(tsval, status):
    text = "--tcp_ts_tick_usecs=1000\n" + LISTEN + f"""\
+0 < S 0:0(0) win 65535 <mss 1000,sackOK,TS val 100 ecr 0,nop,wscale 7>
+0 > S. 0:0(0) ack 1 <mss 1460,sackOK,TS val 100 ecr 100,nop,wscale 7>
+.1 < . 1:1(0) ack 1 win 514 <nop,nop,TS val 200 ecr 100>
+0 accept(3, ..., ...) = 4
+1 write(4, ..., 988) = 988
+0 > P. 1:989(988) ack 1 <nop,nop,TS val {tsval} ecr 200>
"""
    r = run(text)
    assert r.status == status, r.reason
    if status == "fail":
        assert "TS val 700 got 1200" in r.reason


def test_missing_defaults_file_means_upstream_defaults(tmp_path):
    script = tmp_path / "a.pkt"
    script.write_text("`./defaults.sh`\n" + LISTEN + SYN +
                      "+0 > S. 0:0(0) ack 1 <mss 1460,nop,nop,sackOK,nop,wscale 8>\n"
                      "`/tmp/sysctl_restore_${PPID}.sh`\n")
    from shardstack.packetdrill import run_file
    r = run_file(str(script))
    assert r.status == "pass", r.reason


def test_mtu_option_sets_the_mss():
    r = run("--mtu=1000\n" + LISTEN + SYN +
            "+0 > S. 0:0(0) ack 1 <mss 960,nop,nop,sackOK,nop,wscale 7>\n")
    assert r.status == "pass", r.reason


def test_unexpected_success_fails():
    # The engine accepts a connection the script says is not there yet.
    r = run(ESTABLISH.replace("+0  accept(3, ..., ...) = 4\n", "") +
            "+0 fcntl(3, F_SETFL, O_RDWR|O_NONBLOCK) = 0\n"
            "+0 accept(3, ..., ...) = -1 EAGAIN (Resource temporarily unavailable)\n")
    assert r.status == "fail" and "expected -1 EAGAIN" in r.reason


def test_verbose_line_puts_packets_one_above_the_other():
    from shardstack.packetdrill.report import line_for
    r = run(LISTEN + SYN + "+0 > S. 0:0(0) ack 1 win 1234 <mss 1460,nop,nop,sackOK,nop,wscale 7>\n")
    lines = line_for(r, verbose=True).splitlines()
    assert lines[0].startswith("fail t.pkt:6 ")
    assert lines[1].split(":", 1)[1].strip() == \
        "S. 0:0(0) ack 1 win 1234 <mss 1460,nop,nop,sackOK,nop,wscale 7>"
    assert lines[2].split(":", 1)[1].strip().startswith(
        "S. 0:0(0) ack 1 win 64240 <mss 1460,nop,nop,sackOK,nop,wscale 7>")


def test_icmp_lines():
    from shardstack.packetdrill.script import IcmpSpec, parse_packet
    spec = parse_packet(1, "< icmp unreachable frag_needed mtu 1200 [1:1461(1460)]")
    assert isinstance(spec, IcmpSpec)
    assert (spec.itype, spec.code, spec.mtu, spec.seq, spec.length) == \
        ("unreachable", "frag_needed", 1200, 1, 1460)
    r = run(ESTABLISH + "+0 > icmp unreachable\n")
    assert r.status == "skip" and "outbound ICMP" in r.reason


def test_icmp_frag_needed_reaches_the_engine():
    # The engine shrinks its segments: a script expecting the old size fails (strict
    # segments: gluing would join the 1160 and 300 bytes back into one line).
    text = "--strict_segments\n" + LISTEN + """\
+0 < S 0:0(0) win 65535 <mss 1460,nop,wscale 7>
+0 > S. 0:0(0) ack 1 <mss 1460,nop,wscale 7>
+.1 < . 1:1(0) ack 1 win 514
+0 accept(3, ..., ...) = 4
+0 write(4, ..., 1460) = 1460
+0 > P. 1:1461(1460) ack 1
+.01 < icmp unreachable frag_needed mtu 1200 [1:1461(1460)]
+0 > . 1:1461(1460) ack 1
"""
    r = run(text)
    assert r.status == "fail" and "payload length 1460 vs 1160" in r.reason


def test_poll_timeout_counts_from_when_the_call_starts():
    # The poll starts late (it waits for the blocking read before it); its 50 ms
    # timeout runs from then, and nothing loops or returns early.
    r = run(ESTABLISH + """\
+0...0.1 read(4, ..., 1000) = 10
+.1 < P. 1:11(10) ack 1 win 514
+0 > . 1:1(0) ack 11
+0...0.05 poll([{fd=4, events=POLLIN, revents=0}], 1, 50) = 0
""")
    assert r.status == "pass", r.reason
