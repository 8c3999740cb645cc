"""shardstack.affinity: worker CPUs, RPS masks, and writing them only for
the device this process's namespace really has (a fake sysfs tree)."""

from __future__ import annotations

import os
import socket

import pytest

from shardstack import affinity


def test_workers_round_robin_over_usable_cpus():
    assert [affinity.worker_cpu(w, [2, 5]) for w in range(5)] == [2, 5, 2, 5, 2]


@pytest.mark.parametrize("cpus,text", [({0}, "00000001"), ({1}, "00000002"),
                                       ({0, 1, 3}, "0000000b"), ({33}, "00000002,00000000")])
def test_cpu_mask_is_the_sysfs_bitmap_format(cpus, text):
    assert affinity.cpu_mask(cpus) == text


def test_each_queue_steers_away_from_its_worker():
    assert affinity.rps_masks(2, [0, 1]) == {0: {1}, 1: {0}}
    assert affinity.rps_masks(3, [0, 1, 2]) == {0: {1, 2}, 1: {0, 2}, 2: {0, 1}}
    assert affinity.rps_masks(2, [4]) == {}  # one CPU: nowhere to move work to


def _fake_sys(tmp_path, ifindex: int, queues: int):
    dev = tmp_path / "lo"
    for q in range(queues):
        (dev / "queues" / f"rx-{q}").mkdir(parents=True)
        (dev / "queues" / f"rx-{q}" / "rps_cpus").write_text("00000000\n")
    (dev / "ifindex").write_text(f"{ifindex}\n")
    return dev


def test_rps_written_for_the_device_of_this_namespace(tmp_path):
    dev = _fake_sys(tmp_path, socket.if_nametoindex("lo"), 3)
    assert affinity.steer_tun_rps("lo", 2, cpus=[0, 1], sys_net=str(tmp_path))
    assert (dev / "queues/rx-0/rps_cpus").read_text() == "00000002"
    assert (dev / "queues/rx-1/rps_cpus").read_text() == "00000001"
    assert (dev / "queues/rx-2/rps_cpus").read_text() == "00000000\n"  # netio's queue untouched


def test_rps_not_written_when_sysfs_shows_another_namespace(tmp_path):
    dev = _fake_sys(tmp_path, 9999, 2)
    assert not affinity.steer_tun_rps("lo", 2, cpus=[0, 1], sys_net=str(tmp_path))
    assert (dev / "queues/rx-0/rps_cpus").read_text() == "00000000\n"


def test_rps_on_a_missing_device_is_a_no(tmp_path):
    assert not affinity.steer_tun_rps("nosuchdev0", 2, cpus=[0, 1], sys_net=str(tmp_path))


def test_pin_worker_sets_this_process_affinity():
    before = os.sched_getaffinity(0)
    try:
        cpu = affinity.pin_worker(1, sorted(before))
        assert os.sched_getaffinity(0) == {cpu}
        assert cpu == sorted(before)[1 % len(before)]
    finally:
        os.sched_setaffinity(0, before)
