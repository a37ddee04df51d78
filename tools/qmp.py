#!/usr/bin/env python3
"""Sends one command to QEMU's monitor (QMP) and optionally waits for an event.

tools/vfio-guest-test.sh uses it to unplug a function while crypt-vfio drives it in the guest:

    qmp.py SOCKET device_del crypto-hp --wait DEVICE_DELETED --timeout 60

It speaks QMP over the Unix socket QEMU was started with (-qmp unix:SOCKET,server=on,wait=off):
reads the greeting, leaves negotiation mode (qmp_capabilities), sends the command, and with
--wait reads until the named event arrives for that device. It prints one line per step with
the host's CLOCK_MONOTONIC seconds, exits 0 on success, 1 on an error answer or a timeout.
Only the standard library: the test must not install anything.
"""

import argparse
import json
import socket
import sys
import time


def say(msg):
    print(f"qmp: {msg} (host t={time.monotonic():.3f})", flush=True)


class Qmp:
    def __init__(self, path, deadline):
        self.deadline = deadline
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(max(0.1, deadline - time.monotonic()))
        self.sock.connect(path)
        self.buf = b""
        self.events = []

    def read(self):
        """The next JSON message from QEMU."""
        while b"\n" not in self.buf:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            self.sock.settimeout(left)
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("QEMU closed the monitor socket")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line) if line.strip() else self.read()

    def command(self, name, arguments=None):
        msg = {"execute": name}
        if arguments:
            msg["arguments"] = arguments
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            reply = self.read()
            if "event" in reply:
                self.events.append(reply)
            elif "error" in reply:
                raise RuntimeError(f"{name}: {reply['error'].get('desc', reply['error'])}")
            elif "return" in reply:
                return reply["return"]

    def wait_event(self, name, device):
        def matches(ev):
            return ev.get("event") == name and (device is None or ev.get("data", {}).get("device") == device)

        for ev in self.events:
            if matches(ev):
                return ev
        while True:
            ev = self.read()
            if matches(ev):
                return ev


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("socket")
    p.add_argument("command", help="a QMP command; device_del takes the device id as ARG")
    p.add_argument("arg", nargs="?", help="device id for device_del")
    p.add_argument("--wait", metavar="EVENT", help="wait for this event (for the device given)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds for the whole exchange")
    a = p.parse_args()
    deadline = time.monotonic() + a.timeout
    try:
        q = Qmp(a.socket, deadline)
        q.read()  # the greeting
        q.command("qmp_capabilities")
        args = {"id": a.arg} if a.command == "device_del" and a.arg else None
        q.command(a.command, args)
        start = time.monotonic()
        say(f"sent {a.command}{' ' + a.arg if a.arg else ''}")
        if a.wait:
            q.wait_event(a.wait, a.arg)
            say(f"{a.wait} {a.arg or ''} after {time.monotonic() - start:.3f} s")
    except TimeoutError:
        say(f"timeout after {a.timeout} s" + (f" waiting for {a.wait}" if a.wait else ""))
        return 1
    except (OSError, RuntimeError, ValueError) as e:
        say(f"error: {e}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
