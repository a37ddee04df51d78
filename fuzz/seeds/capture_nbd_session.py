#!/usr/bin/env python3
"""Records what real NBD clients send to `crypt-vfio serve`, as seed corpora for the fuzz
targets nbd_handshake (the whole client stream) and nbd_requests (the part after NBD_OPT_GO).

Usage: capture_nbd_session.py CRYPT_VFIO_BINARY OUT_DIR
Runs `serve --raw` over a scratch image, puts a recording TCP proxy in front of it, and drives
qemu-img, qemu-io, nbdinfo and nbdcopy (whichever are installed) through the proxy, one session per file.
"""
import os, shutil, socket, subprocess, sys, tempfile, threading

REQUEST_MAGIC = bytes.fromhex("25609513")


def pump(src, dst, record):
    while True:
        try:
            b = src.recv(65536)
        except OSError:
            b = b""
        if not b:
            try:
                dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            return
        if record is not None:
            record.append(b)
        dst.sendall(b)


def proxy_once(listener, upstream, record):
    client, _ = listener.accept()
    server = socket.create_connection(upstream)
    a = threading.Thread(target=pump, args=(client, server, record))
    b = threading.Thread(target=pump, args=(server, client, None))
    a.start(); b.start(); a.join(); b.join()
    client.close(); server.close()


def main():
    binary, out = sys.argv[1], sys.argv[2]
    os.makedirs(os.path.join(out, "nbd_handshake"), exist_ok=True)
    os.makedirs(os.path.join(out, "nbd_requests"), exist_ok=True)
    tmp = tempfile.mkdtemp()
    img = os.path.join(tmp, "disk.img")
    with open(img, "wb") as f:
        f.truncate(1 << 20)
    srv = subprocess.Popen([binary, "serve", "--raw", img, "--export", "disk", "--listen", "127.0.0.1:0"],
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = srv.stdout.readline()
    host, port = line.split("nbd://")[1].split("/")[0].rsplit(":", 1)
    upstream = (host, int(port))
    sessions = []
    if shutil.which("qemu-img"):
        sessions.append(("qemu-img-info", ["qemu-img", "info", "nbd://{}/disk"]))
        sessions.append(("qemu-img-convert", ["qemu-img", "convert", "-O", "raw", "nbd://{}/disk",
                                              os.path.join(tmp, "copy.raw")]))
    if shutil.which("qemu-io"):
        sessions.append(("qemu-io-rw", ["qemu-io", "-f", "raw", "-c", "write -P 0x5a 4096 65536",
                                        "-c", "read -P 0x5a 4096 65536", "-c", "write -z 0 8192",
                                        "-c", "discard 65536 4096", "-c", "flush",
                                        "-c", "aio_write -P 0x33 512 1024", "-c", "aio_flush",
                                        "nbd://{}/disk"]))
    if shutil.which("nbdinfo"):
        sessions.append(("nbdinfo", ["nbdinfo", "nbd://{}/disk"]))
        sessions.append(("nbdinfo-list", ["nbdinfo", "--list", "nbd://{}"]))
    if shutil.which("nbdcopy"):
        sessions.append(("nbdcopy-out", ["nbdcopy", "--connections=1", "nbd://{}/disk",
                                         os.path.join(tmp, "copy2.raw")]))
    for name, argv in sessions:
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        addr = "127.0.0.1:%d" % listener.getsockname()[1]
        record = []
        t = threading.Thread(target=proxy_once, args=(listener, upstream, record))
        t.start()
        subprocess.run([a.replace("{}", addr) for a in argv], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)
        t.join(timeout=30)
        listener.close()
        data = b"".join(record)
        with open(os.path.join(out, "nbd_handshake", name), "wb") as f:
            f.write(data)
        # The request stream starts at the first request magic after the 4 client flag bytes.
        at = data.find(REQUEST_MAGIC, 4)
        if at > 0:
            with open(os.path.join(out, "nbd_requests", name), "wb") as f:
                f.write(data[at:])
        print(name, len(data), "bytes")
    srv.terminate()
    srv.wait()
    shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
