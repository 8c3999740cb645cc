"""cwnd over time, CUBIC vs Reno, for a bulk transfer over a lossy simulated link.

    .venv/bin/python bench/bench_cwnd.py [--loss 0.01] [--size MiB] [--model auto|engine|fluid]

``engine`` runs two ``shardstack.core.Shard`` instances joined by
``netio.simlink.SimLink`` (fake clock, seeded loss), one sending ``--size`` MiB
to the other, and samples the sender's congestion-control object (the
connection's ``cc``) after every simulated event.  ``fluid`` is a
round-per-RTT model used when the engine is not available: each RTT the
sender offers ``cwnd`` segments, each is lost with probability ``--loss`` or
tail-dropped when the window overflows the bottleneck's BDP + queue, and the
real ``tcp_cong`` / ``tcp_cubic`` objects see the ACKs, dup ACKs, fast
retransmits and RTOs that follow.  ``auto`` tries the engine first.

Prints a summary table and writes a PNG under ``bench/results/``.  Figures are
simulated time, not wall-clock speed (except the ``wall`` column).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from shardstack.core import tcp_cong

RESULTS = Path(__file__).resolve().parent / "results"

# Link shared by both models: 20 Mbit/s bottleneck, 40 ms RTT, 64 KiB queue.
BANDWIDTH = 20e6 / 8  # bytes/s
ONE_WAY = 0.020
QUEUE = 64 * 1024
MSS = 1448


@dataclass
class Run:
    algo: str
    model: str
    samples: list[tuple[float, int]] = field(default_factory=list)  # (t, cwnd segments)
    bytes_done: int = 0
    sim_time: float = 0.0
    wall: float = 0.0
    losses: int = 0  # fast retransmits entered
    rtos: int = 0
    link_drops: int = 0
    extra: str = ""

    @property
    def goodput_mbps(self) -> float:
        return self.bytes_done * 8 / self.sim_time / 1e6 if self.sim_time else 0.0

    @property
    def mean_cwnd(self) -> float:
        s = self.samples
        if len(s) < 2:
            return float(s[0][1]) if s else 0.0
        area = sum((t1 - t0) * c0 for (t0, c0), (t1, _) in zip(s, s[1:], strict=False))
        return area / (s[-1][0] - s[0][0])


# -- fluid (round-based) model ---------------------------------------------------------


def run_fluid(algo: str, loss: float, size: int, seed: int) -> Run:
    """One round per RTT; the congestion-control object is the real one."""
    rng = random.Random(seed)
    cc = tcp_cong.get(algo)()
    cc.init(MSS, 0.0)
    run = Run(algo, "fluid")
    bdp = BANDWIDTH * 2 * ONE_WAY / MSS  # segments the pipe holds
    cap = bdp + QUEUE / MSS  # beyond this the queue tail-drops
    now, done = 0.0, 0
    t0 = time.perf_counter()
    while done < size and now < 3600:
        w = cc.cwnd
        run.samples.append((now, w))
        rtt = 2 * ONE_WAY + max(0.0, min(w, cap) - bdp) * MSS / BANDWIDTH
        span = max(rtt, min(w, cap) * MSS / BANDWIDTH)  # a round can't beat the link
        lost = [i >= cap or rng.random() < loss for i in range(w)]
        run.link_drops += sum(lost)
        first = lost.index(True) if any(lost) else w
        for i in range(first):  # ACKs up to the first hole
            cc.on_ack(1, rtt, now + span * i / w, w)
        done += first * MSS
        if first < w:
            dups = w - first - sum(lost[first + 1:])
            for _ in range(min(dups, 3)):
                cc.on_dup_ack()
            if dups >= 3:  # fast retransmit; the hole and later losses repaired in one RTT
                cc.on_loss(now + span, w)
                run.losses += 1
                for _ in range(dups - 3):
                    cc.on_dup_ack()
                now += span
                run.samples.append((now, cc.cwnd))
                done += (w - first) * MSS
                cc.on_recovery_exit(now + rtt)
                now += rtt
                continue
            rto = max(0.2, 2 * rtt)  # too few dup ACKs: wait for the RTO (RFC 6298 min 200 ms)
            now += span + rto
            cc.on_rto(now, w)
            run.rtos += 1
            continue
        now += span
    run.samples.append((now, cc.cwnd))
    run.bytes_done, run.sim_time = min(done, size), now
    run.wall = time.perf_counter() - t0
    return run


# -- the real engine over SimLink --------------------------------------------------------


def run_engine(algo: str, loss: float, size: int, seed: int, max_time: float = 600.0) -> Run:
    """``size`` bytes from a client Shard to a server Shard over SimLink.

    Loss applies to both directions; the data direction has the 20 Mbit/s
    bottleneck with its tail-drop queue.  cwnd is read from the sending
    connection's congestion-control object (``shard.sock(sd).cc``) after every
    simulated event, and recorded when it changes.
    """
    from shardstack.core.events import Acceptable, Connected, Readable, SocketError, Writable
    from shardstack.core.shard import Shard, ShardConfig
    from shardstack.netio.simlink import LinkParams, SimLink

    a_ip, b_ip = 0xC6120001, 0xC6120002  # 198.18.0.1 -> 198.18.0.2
    cli = Shard(ShardConfig(addrs=[a_ip], secret=b"bench-cli", congestion=algo), 0.0)
    srv = Shard(ShardConfig(addrs=[b_ip], secret=b"bench-srv"), 0.0)
    lsd = srv.socket()
    srv.bind(lsd, b_ip, 5001)
    srv.listen(lsd, 16)
    csd = cli.socket()
    cli.connect(csd, b_ip, 5001, 0.0)
    link = SimLink(
        cli, srv, seed=seed,
        a_to_b=LinkParams(delay=ONE_WAY, loss=loss, bandwidth=BANDWIDTH, queue_bytes=QUEUE),
        b_to_a=LinkParams(delay=ONE_WAY, loss=loss),
    )
    payload = memoryview(bytes(size))
    run = Run(algo, "engine")
    st = {"sent": 0, "got": 0, "child": None, "last": -1}
    sk = cli.sock(csd)

    def push() -> None:
        while st["sent"] < size:
            n = cli.send(csd, payload[st["sent"]:st["sent"] + 256 * 1024], link.now)
            if not n:
                return
            st["sent"] += n

    def progress() -> bool:
        for ev in cli.take_events():
            if isinstance(ev, SocketError):
                raise RuntimeError(f"client socket error {ev}")
            if isinstance(ev, Writable | Connected):
                push()
        for ev in srv.take_events():
            if isinstance(ev, Acceptable) and st["child"] is None:
                got = srv.accept(lsd)
                if got:
                    st["child"] = got[0]
                    ev = Readable(got[0])
            if isinstance(ev, Readable) and st["child"] is not None:
                while True:
                    data = srv.recv(st["child"], 1 << 20)
                    if not data:
                        break
                    st["got"] += len(data)
        cc = sk.cc
        if cc is not None and cc.cwnd != st["last"]:
            st["last"] = cc.cwnd
            run.samples.append((link.now, cc.cwnd))
        return st["got"] >= size

    t0 = time.perf_counter()
    ok = link.run_until(progress, max_time=max_time)
    run.wall = time.perf_counter() - t0
    if not ok:
        raise RuntimeError(f"transfer incomplete: {st['got']}/{size} bytes by t={link.now:.1f}")
    run.samples.append((link.now, sk.cc.cwnd))
    run.bytes_done, run.sim_time = st["got"], link.now
    run.losses = cli.stats.fast_retrans
    run.rtos = cli.stats.rto_fires
    run.link_drops = (link.stats_ab.lost + link.stats_ab.queue_drops + link.stats_ba.lost)
    run.extra = (f"retrans={cli.stats.retrans_segs} queue_drops={link.stats_ab.queue_drops} "
                 f"max_queue={link.stats_ab.max_queue_bytes} events={link.steps}")
    return run


# -- report ------------------------------------------------------------------------------


def plot(runs: list[Run], loss: float, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4.5))
    for r in runs:
        ts = [t for t, _ in r.samples]
        cw = [c for _, c in r.samples]
        ax.step(ts, cw, where="post", lw=1,
                label=f"{r.algo} ({r.goodput_mbps:.1f} Mbit/s, {r.losses} FR, {r.rtos} RTO)")
    bdp = BANDWIDTH * 2 * ONE_WAY / MSS
    ax.axhline(bdp, color="grey", ls=":", lw=1, label=f"BDP {bdp:.0f} seg")
    ax.set_xlabel("simulated time (s)")
    ax.set_ylabel("cwnd (segments)")
    ax.set_title(f"cwnd, {runs[0].model} model: 20 Mbit/s, 40 ms RTT, {loss:.0%} random loss")
    ax.legend(loc="upper right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--loss", type=float, default=0.01)
    ap.add_argument("--size", type=float, default=16.0, help="MiB to transfer")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--model", choices=("auto", "engine", "fluid"), default="auto")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    size = int(args.size * 1024 * 1024)
    model = args.model
    runs: list[Run] = []
    for algo in ("cubic", "reno"):
        if model in ("auto", "engine"):
            try:
                runs.append(run_engine(algo, args.loss, size, args.seed))
                model = "engine"
                continue
            except (ImportError, NotImplementedError) as e:
                if model == "engine":
                    raise
                print(f"engine unavailable ({e!r}); using the fluid model", file=sys.stderr)
                model = "fluid"
        runs.append(run_fluid(algo, args.loss, size, args.seed))
    out = args.out or RESULTS / f"cwnd_{model}_loss{args.loss * 100:g}pct.png"
    plot(runs, args.loss, out)
    print(f"model={model} loss={args.loss:.2%} size={args.size:g} MiB link=20 Mbit/s rtt=40 ms")
    print(f"{'algo':6} {'sim s':>8} {'Mbit/s':>8} {'mean cwnd':>10} {'max cwnd':>9} "
          f"{'FR':>5} {'RTO':>4} {'drops':>6} {'wall s':>7}")
    for r in runs:
        print(f"{r.algo:6} {r.sim_time:8.2f} {r.goodput_mbps:8.2f} {r.mean_cwnd:10.1f} "
              f"{max(c for _, c in r.samples):9d} {r.losses:5d} {r.rtos:4d} {r.link_drops:6d} "
              f"{r.wall:7.2f}")
        if r.extra:
            print(f"       {r.extra}")
    print(f"plot: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
