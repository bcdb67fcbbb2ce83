#!/usr/bin/python3
"""A slow Ethernet hub in user space, for kernels without tc's netem: one TAP
device in each given network namespace, every frame one port receives copied
to every other port after DELAY ms, each port sending at most RATE Mbit/s
(frames queue behind each other, as on a real link).

usage: delay_wire.py DELAY_MS RATE_MBIT IFNAME NAMESPACE...
Prints "ready" once every TAP exists (the caller then gives them addresses
and brings them up) and forwards until killed. Needs root.
"""
import ctypes
import fcntl
import heapq
import os
import select
import struct
import sys
import time

TUNSETIFF = 0x400454CA
IFF_TAP, IFF_NO_PI = 0x0002, 0x1000
CLONE_NEWNET = 0x40000000


def open_tap(namespace, ifname):
    """A TAP named ifname, created inside namespace (it stays there)."""
    libc = ctypes.CDLL(None, use_errno=True)
    home = os.open("/proc/self/ns/net", os.O_RDONLY)
    ns = os.open(f"/var/run/netns/{namespace}", os.O_RDONLY)
    try:
        if libc.setns(ns, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {namespace}")
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", ifname.encode(), IFF_TAP | IFF_NO_PI))
    finally:
        libc.setns(home, CLONE_NEWNET)
        os.close(ns)
        os.close(home)
    return fd


def forward(ports, delay, bytes_per_second):
    """Hub loop: a frame read on one port leaves every other port at
    max(arrival + delay, that port's link free) and holds the link for its
    serialization time."""
    pending = []  # (release time, sequence, port, frame)
    link_free = {p: 0.0 for p in ports}
    sequence = 0
    while True:
        timeout = max(0.0, pending[0][0] - time.monotonic()) if pending else None
        readable, _, _ = select.select(ports, [], [], timeout)
        now = time.monotonic()
        for src in readable:
            while True:
                try:
                    frame = os.read(src, 65536)
                except BlockingIOError:
                    break
                for dst in ports:
                    if dst == src:
                        continue
                    start = max(now + delay, link_free[dst])
                    link_free[dst] = start + len(frame) / bytes_per_second
                    heapq.heappush(pending, (link_free[dst], sequence, dst, frame))
                    sequence += 1
        now = time.monotonic()
        while pending and pending[0][0] <= now:
            _, _, dst, frame = heapq.heappop(pending)
            try:
                os.write(dst, frame)
            except (BlockingIOError, OSError):
                pass  # a full or downed port drops the frame, as a switch would


def main():
    if len(sys.argv) < 5:
        sys.exit(__doc__)
    delay = float(sys.argv[1]) / 1e3
    bytes_per_second = float(sys.argv[2]) * 1e6 / 8
    ifname = sys.argv[3]
    ports = [open_tap(ns, ifname) for ns in sys.argv[4:]]
    print("ready", flush=True)
    forward(ports, delay, bytes_per_second)


if __name__ == "__main__":
    main()
