"""shardstack.netio: the device side of the stack.

Modules (see docs/architecture.md, section "netio"):

- `rss`: Toeplitz hash (reference, table-driven, folded symmetric) and the RETA.
- `device`: the batch device interface; `TunDevice`, `PacketDevice`, `LoopbackDevice`.
- `impair`, `pcap`, `trace`: wrappers that stack on any device.
- `dispatch`: the pure steering of frames to workers, ARP and ICMP echo answers.
- `neighbour`: the ARP-filled neighbour table (Linux NUD states) that workers mirror.
- `process`: the netio process loop (device -> dispatcher -> ZeroMQ per worker).
- `simlink`: a simulated link between two sans-I/O endpoints on a fake clock
  (tests and benches: the wire, with seeded loss, delay and reordering).

Importing this package imports nothing heavy; import the modules you need.
"""
