"""The fuzzer of ``Shard.receive`` as tests (issue 11); see ``fuzz_receive.py``.

- Every corpus input replays (the regression set: the seeds, one per
  conversation, and every input the fuzzer ever broke the engine with).
- slow: bounded runs of the same property: coverage-guided (atheris, when
  it imports), the plain corpus mutator, and hypothesis.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from fuzz_receive import CORPUS, run_one, seeds
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

HERE = Path(__file__).resolve().parent


def test_corpus_is_there():
    assert len(seeds()) >= 14  # at least one per conversation


@pytest.mark.parametrize("path", sorted(p.name for p in CORPUS.iterdir()))
def test_corpus_input_keeps_the_invariants(path):
    run_one((CORPUS / path).read_bytes())


@pytest.mark.parametrize("path", sorted(p.name for p in CORPUS.iterdir()))
def test_corpus_input_keeps_the_invariants_over_ipv6(path):
    """The same script over IPv6 (dual-stack shard, extension headers, ICMPv6)."""
    run_one((CORPUS / path).read_bytes(), v6=True)


@pytest.mark.slow
def test_atheris_bounded_run(tmp_path):
    pytest.importorskip("atheris")
    runs = int(os.environ.get("SHARDSTACK_FUZZ_RUNS", "10000"))  # ~300/s instrumented
    new = tmp_path / "new"
    new.mkdir()
    env = dict(os.environ, PYTHONHASHSEED="0")
    r = subprocess.run([sys.executable, str(HERE / "fuzz_receive.py"), f"-runs={runs}",
                        "-seed=1", "-max_len=512", "-print_final_stats=1",
                        f"-artifact_prefix={tmp_path}/", str(new), str(CORPUS)],
                       capture_output=True, text=True, timeout=900, env=env)
    crashes = list(tmp_path.glob("crash-*")) + list(tmp_path.glob("timeout-*"))
    if crashes:  # keep the reproducer next to the failure report
        shutil.copy(crashes[0], Path(os.environ.get("TMPDIR", "/tmp")) / crashes[0].name)
    assert r.returncode == 0 and not crashes, r.stderr[-3000:]


@pytest.mark.slow
def test_plain_bounded_run():
    """30000 corpus mutations and random inputs (seeded), ~30 s."""
    from fuzz_receive import plain

    assert plain(int(os.environ.get("SHARDSTACK_FUZZ_PLAIN", "30000")), seed=11, every=0) > 0


@pytest.mark.slow
@settings(max_examples=int(os.environ.get("SHARDSTACK_FUZZ_EXAMPLES", "3000")),
          deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.binary(min_size=4, max_size=512))
def test_hypothesis_bounded_run(data):
    run_one(data)
    run_one(data, v6=True)
