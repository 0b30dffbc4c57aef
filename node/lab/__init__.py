"""The WAN lab (issue 13): far-apart regions emulated on one machine.

Everything on loopback has zero delay, yet sfumesh exists for people who are far apart. The
lab puts each host (node, client, Redis, store) in its own network namespace and joins them
through a userspace link emulator (the kernel here has no netem, see research/FINDINGS.md,
"WAN emulation on these machines").

* `node.lab.params`: what one link does (delay, jitter, loss, bursty loss, rate, queue).
* `node.lab.topology`: the TOML topology file (regions, hosts, core matrix, access links).
* `node.lab.link`: the pure, seeded link model and packet scheduler (no I/O).
* `node.lab.kernel`: the few system calls the I/O shell needs (TUN, timerfd, setns).
* `node.lab.namespaces`: one network namespace per host, torn down by PID.
* `node.lab.emulator`: the emulator process (TUN devices + epoll around `node.lab.link`).
* `node.lab.selftest`: `sfumesh lab selftest`, the emulator measured on this machine.
* `node.lab.cluster`: `LabCluster`, Redis, the store and the nodes (with their Serf agents)
  running on the topology's hosts: `sfumesh lab`, its tests and the benches use it.
* `node.lab.mesh_timing`: the mesh's own timings across the links (Serf join, failure
  detection).
"""
