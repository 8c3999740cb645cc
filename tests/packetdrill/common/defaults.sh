#!/bin/sh
# The TCP settings every script here assumes: Linux's classic defaults (the
# runner's "linux" profile).  Run by each script inside packetdrill's own
# network namespace; shardstack's runner reads the same lines as settings.
sysctl -q net.ipv4.tcp_rmem="4096 131072 6291456"
sysctl -q net.ipv4.tcp_wmem="4096 16384 4194304"
sysctl -q net.ipv4.tcp_timestamps=1
sysctl -q net.ipv4.tcp_sack=1
sysctl -q net.ipv4.tcp_window_scaling=1
sysctl -q net.ipv4.tcp_syncookies=1
sysctl -q net.ipv4.tcp_congestion_control=cubic
sysctl -q net.ipv4.tcp_ecn=2
sysctl -q net.ipv4.tcp_syn_retries=6
sysctl -q net.ipv4.tcp_synack_retries=5
ip tcp_metrics flush all > /dev/null 2>&1
tc qdisc replace dev tun0 root pfifo
# Segments as they go on the wire, not TSO/GSO super-packets (the runner's
# virtual mode sends MSS-sized segments too).
ethtool -K tun0 tso off gso off
