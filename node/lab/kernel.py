"""The few Linux calls the lab needs that Python 3.11's standard library lacks.

A TUN device is one `ioctl(TUNSETIFF)` (fcntl); `timerfd` (sub-millisecond wake-ups: epoll's
own timeout has millisecond steps, which alone would cost the emulator up to 1 ms of delay
error) and `setns` are libc calls through ctypes (`os.setns` and `os.timerfd_*` arrive only
in 3.12/3.13), as is the timer slack. Linux only.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import struct
from typing import Final

TUN_PATH: Final = "/dev/net/tun"
_TUNSETIFF: Final = 0x400454CA
_IFF_TUN: Final = 0x0001
_IFF_NO_PI: Final = 0x1000
_CLOCK_MONOTONIC: Final = 1
_TFD_NONBLOCK: Final = os.O_NONBLOCK
_TFD_CLOEXEC: Final = os.O_CLOEXEC
_TFD_TIMER_ABSTIME: Final = 1
CLONE_NEWNET: Final = 0x40000000
_PR_SET_TIMERSLACK: Final = 29
#: an interface name is at most 15 bytes
IFNAMSIZ: Final = 16

_libc = ctypes.CDLL(None, use_errno=True)


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


def _check(result: int, what: str) -> int:
    if result < 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")
    return result


def open_tun(name: str) -> int:
    """A new TUN device `name` (IP packets, no extra header); its non-blocking fd. The device
    lives as long as the fd (not persistent): closing it removes the device."""
    if len(name.encode()) >= IFNAMSIZ:
        raise ValueError(f"interface name too long: {name!r}")
    fd = os.open(TUN_PATH, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH22x", name.encode(), _IFF_TUN | _IFF_NO_PI))
    except OSError:
        os.close(fd)
        raise
    return fd


def timerfd() -> int:
    """A non-blocking CLOCK_MONOTONIC timerfd (the clock of `time.monotonic`)."""
    return _check(_libc.timerfd_create(_CLOCK_MONOTONIC, _TFD_NONBLOCK | _TFD_CLOEXEC), "timerfd")


def arm_timerfd(fd: int, at: float | None) -> None:
    """Fire `fd` at monotonic time `at` (seconds; a past time fires at once), or disarm it."""
    spec = _Itimerspec()
    if at is not None:
        # 0/0 would disarm: a past deadline becomes the earliest possible one
        seconds, nanoseconds = divmod(max(1, round(at * 1e9)), 1_000_000_000)
        spec.it_value.tv_sec = seconds
        spec.it_value.tv_nsec = nanoseconds
    _check(_libc.timerfd_settime(fd, _TFD_TIMER_ABSTIME, ctypes.byref(spec), None), "timerfd")


def setns_net(path: str) -> None:
    """Move the calling THREAD into the network namespace at `path` (/proc/PID/ns/net)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        _check(_libc.setns(fd, CLONE_NEWNET), f"setns {path}")
    finally:
        os.close(fd)


def tight_timers() -> None:
    """1 ns timer slack for this thread (the default 50 us would add to every wake-up)."""
    _check(_libc.prctl(_PR_SET_TIMERSLACK, 1, 0, 0, 0), "prctl(PR_SET_TIMERSLACK)")
