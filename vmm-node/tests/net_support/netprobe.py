"""Host-side network probe for vmm-node's virtio-net tests. Runs inside the test's network
namespace (`ip netns exec NS python3 netprobe.py MODE ...`) and never talks to anything
outside it. Every mode is bounded in packets and time and prints one JSON line at the end
(`capture` and `stream` also print `READY` once their socket is bound).

Modes:
  arp IFACE SRC_IP TARGET_IP TIMEOUT_S        ARP request from IFACE; reply's sender MAC
  udp DST_IP PORT SIZE COUNT TIMEOUT_S [df]   COUNT echoes of SIZE-byte payloads, one at a time
                                              (df: never fragment, IP_PMTUDISC_DO)
  fenced DST_IP PORT SIZE TIMEOUT_S           a SIZE-byte echo request (df) then a 16-byte one
                                              (the fence); waits for the fence's reply and says
                                              whether the big one was answered before it
  icmp DST_IP COUNT TIMEOUT_S                 ICMP echo requests
  stream DST_IP PORT RATE_HZ STOP_FILE MAX_S  sequence-numbered echoes at RATE_HZ until STOP_FILE
                                              (prints `RX n` every 500 replies)
  burst DST_IP PORT COUNT STOP_FILE MAX_S     COUNT sequence-numbered echo requests 1 ms apart
                                              (prints `SENT n`), then every reply until all
                                              came back or STOP_FILE; replies per sequence
  capture IFACE ETHERTYPE MAC STOP_FILE MAX_S frames of ETHERTYPE from MAC received on IFACE;
                                              prints `SEEN n` for each one
  migwatch MAC TAP STOP_FILE MAX_S [SRC_TAP]  frames from MAC entering TAP (which may not exist
                                              yet), seen on every interface of the namespace:
                                              the first one's type (`FIRST 0x8035`), RARP and
                                              IPv4 counts (`TAP_IPV4 n` every 100); with
                                              SRC_TAP, frames from MAC entering it after that
"""
import json
import os
import select
import socket
import struct
import sys
import time

IP_MTU_DISCOVER = 10
IP_PMTUDISC_DO = 2


def out(obj):
    print(json.dumps(obj), flush=True)


def mac_bytes(s):
    return bytes(int(x, 16) for x in s.split(":"))


def mac_str(b):
    return ":".join("%02x" % x for x in b)


def arp(iface, src_ip, target_ip, timeout):
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0806))
    s.bind((iface, 0))
    my_mac = s.getsockname()[4][:6]
    req = (b"\xff" * 6 + my_mac + struct.pack("!H", 0x0806)
           + struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1)
           + my_mac + socket.inet_aton(src_ip) + b"\x00" * 6 + socket.inet_aton(target_ip))
    req += b"\x00" * (60 - len(req))
    deadline = time.time() + timeout
    next_send = 0.0
    while time.time() < deadline:
        if time.time() >= next_send:
            s.send(req)
            next_send = time.time() + 0.5
        r, _, _ = select.select([s], [], [], 0.1)
        if not r:
            continue
        f = s.recv(2048)
        if len(f) < 42 or struct.unpack("!H", f[12:14])[0] != 0x0806:
            continue
        op = struct.unpack("!H", f[20:22])[0]
        if op == 2 and f[28:32] == socket.inet_aton(target_ip):
            return out({"ok": True, "mac": mac_str(f[22:28]), "eth_src": mac_str(f[6:12])})
    out({"ok": False, "error": "no ARP reply within %ss" % timeout})


def udp(dst, port, size, count, timeout, df=False):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    if df:
        s.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DO)
    ok = 0
    rtts = []
    for i in range(count):
        payload = struct.pack("!I", i) + bytes((i + k) & 0xff for k in range(size - 4))
        t0 = time.time()
        try:
            s.sendto(payload, (dst, port))
        except OSError as e:
            return out({"ok": False, "replied": ok, "count": count, "error": "send: %s" % e})
        deadline = t0 + timeout
        while True:
            left = deadline - time.time()
            if left <= 0:
                break
            r, _, _ = select.select([s], [], [], left)
            if not r:
                break
            data, _ = s.recvfrom(65536)
            if data == payload:
                ok += 1
                rtts.append(time.time() - t0)
                break
    out({"ok": ok == count, "replied": ok, "count": count,
         "max_rtt_ms": round(max(rtts) * 1e3, 3) if rtts else None})


def fenced(dst, port, size, timeout):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    s.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DO)
    tag = struct.pack("!d", time.time())
    big = b"BIG!" + tag + bytes(k & 0xff for k in range(size - 12))
    fence = b"FENC" + tag + b"\x00" * 4
    try:
        s.sendto(big, (dst, port))
        s.sendto(fence, (dst, port))
    except OSError as e:
        return out({"fence": False, "big": False, "error": "send: %s" % e})
    got_big = False
    deadline = time.time() + timeout
    while True:
        left = deadline - time.time()
        if left <= 0:
            break
        r, _, _ = select.select([s], [], [], left)
        if not r:
            break
        data, _ = s.recvfrom(65536)
        if data == big:
            got_big = True
        elif data == fence:
            return out({"fence": True, "big": got_big})
    out({"fence": False, "big": got_big, "error": "no reply to the fence within %ss" % timeout})


def icmp_checksum(b):
    if len(b) % 2:
        b += b"\x00"
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    while s >> 16:
        s = (s & 0xffff) + (s >> 16)
    return (~s) & 0xffff


def icmp(dst, count, timeout):
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    ok = 0
    for seq in range(count):
        body = struct.pack("!HH", 0x4242, seq) + b"vmm-node-icmp" * 4
        pkt = struct.pack("!BBH", 8, 0, 0) + body
        pkt = struct.pack("!BBH", 8, 0, icmp_checksum(pkt)) + body
        s.sendto(pkt, (dst, 0))
        deadline = time.time() + timeout
        while time.time() < deadline:
            r, _, _ = select.select([s], [], [], max(0, deadline - time.time()))
            if not r:
                break
            data, _ = s.recvfrom(65536)
            ihl = (data[0] & 0xf) * 4
            reply = data[ihl:]
            if reply[0] == 0 and reply[4:] == body and icmp_checksum(reply) == 0:
                ok += 1
                break
    out({"ok": ok == count, "replied": ok, "count": count})


def stream(dst, port, rate, stop_file, max_s):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setblocking(False)
    period = 1.0 / rate
    sent = {}
    got = {}
    t_start = time.time()
    seq = 0
    next_t = t_start
    stop_at = None
    print("READY", flush=True)
    while True:
        now = time.time()
        if stop_at is None and (os.path.exists(stop_file) or now - t_start > max_s):
            stop_at = now + 1.0  # wait for late replies
        if stop_at is not None and now >= stop_at:
            break
        if stop_at is None and now >= next_t:
            s.sendto(struct.pack("!Id", seq, now) + b"x" * 56, (dst, port))
            sent[seq] = now
            seq += 1
            next_t += period
            if next_t < now - 1.0:
                next_t = now
        timeout = max(0.0, min(next_t - time.time(), 0.01))
        r, _, _ = select.select([s], [], [], timeout)
        if r:
            while True:
                try:
                    data = s.recv(2048)
                except BlockingIOError:
                    break
                if len(data) >= 12:
                    q = struct.unpack("!I", data[:4])[0]
                    if q in sent and q not in got:
                        got[q] = time.time()
                        if len(got) % 500 == 0:
                            print("RX %d" % len(got), flush=True)
    seqs = sorted(sent)
    lost = [q for q in seqs if q not in got]
    # Longest silence between consecutive replies (by arrival time).
    arrivals = sorted(got.values())
    gaps = [(b - a, a) for a, b in zip(arrivals, arrivals[1:])]
    longest, longest_at = max(gaps) if gaps else (None, None)
    # The blackout: the longest run of consecutive lost sequence numbers.
    best = (0, None)
    run_start, run_len = None, 0
    for q in seqs:
        if q not in got:
            if run_start is None:
                run_start, run_len = q, 0
            run_len += 1
            if run_len > best[0]:
                best = (run_len, run_start)
        else:
            run_start, run_len = None, 0
    out({"sent": len(seqs), "received": len(got), "lost": len(lost),
         "longest_silence_start_unix": longest_at,
         "lost_seqs": lost[:2000], "lost_sent_unix": [sent[q] for q in lost], "longest_silence_ms": round(longest * 1e3, 3) if longest else None,
         "longest_loss_run": best[0], "longest_loss_run_start": best[1],
         "longest_loss_run_start_unix": sent.get(best[1]) if best[1] is not None else None})


def burst(dst, port, count, stop_file, max_s):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    print("READY", flush=True)
    for q in range(count):
        s.sendto(struct.pack("!I", q) + b"burst" + b"y" * 51, (dst, port))
        time.sleep(0.001)
    print("SENT %d" % count, flush=True)
    got = {}
    t0 = time.time()
    while not os.path.exists(stop_file) and time.time() - t0 < max_s and len(got) < count:
        r, _, _ = select.select([s], [], [], 0.05)
        if not r:
            continue
        data = s.recv(2048)
        if len(data) >= 9 and data[4:9] == b"burst":
            q = struct.unpack("!I", data[:4])[0]
            got[q] = got.get(q, 0) + 1
    out({"sent": count, "received": len(got), "missing": [q for q in range(count) if q not in got],
         "duplicates": sum(n - 1 for n in got.values())})


def capture(iface, ethertype, mac, stop_file, max_s):
    # ETH_P_ALL: on a bridge port, protocol-specific sockets miss the frames the bridge
    # takes; "all" sockets see them before the bridge does.
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
    s.bind((iface, 0))
    want = mac_bytes(mac)
    seen = []
    print("READY", flush=True)
    t0 = time.time()
    while not os.path.exists(stop_file) and time.time() - t0 < max_s:
        r, _, _ = select.select([s], [], [], 0.05)
        if not r:
            continue
        f, addr = s.recvfrom(65536)
        if (len(f) >= 14 and f[6:12] == want and addr[2] != socket.PACKET_OUTGOING
                and struct.unpack("!H", f[12:14])[0] == ethertype):
            seen.append({"t": time.time(), "dst": mac_str(f[0:6]), "len": len(f),
                         "pkttype": addr[2], "op": struct.unpack("!H", f[20:22])[0] if len(f) >= 22 else None})
            print("SEEN %d" % len(seen), flush=True)
    out({"frames": seen})


def migwatch(mac, tap, stop_file, max_s, src_tap=None):
    # Not bound: an ETH_P_ALL socket sees frames entering every interface of the namespace,
    # also ones created after it was opened, before the bridge handles them.
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
    try:
        s.setsockopt(socket.SOL_SOCKET, 33, 16 << 20)  # SO_RCVBUFFORCE
    except OSError:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 << 20)
    want = mac_bytes(mac)
    first = None
    rarp = 0
    ipv4 = 0
    first_ipv4 = None
    src_after = []  # frames from MAC entering SRC_TAP after the first one entered TAP
    print("READY", flush=True)
    t0 = time.time()
    while not os.path.exists(stop_file) and time.time() - t0 < max_s:
        r, _, _ = select.select([s], [], [], 0.05)
        if not r:
            continue
        f, addr = s.recvfrom(65536)
        if addr[2] == socket.PACKET_OUTGOING or len(f) < 14 or f[6:12] != want:
            continue
        if addr[0] == src_tap and first is not None and len(src_after) < 100:
            src_after.append({"t": time.time(), "ethertype": struct.unpack("!H", f[12:14])[0],
                              "len": len(f)})
        if addr[0] != tap:
            continue
        et = struct.unpack("!H", f[12:14])[0]
        now = time.time()
        if first is None:
            first = {"t": now, "ethertype": et, "dst": mac_str(f[0:6]), "len": len(f)}
            print("FIRST 0x%04x" % et, flush=True)
        if et == 0x8035:
            rarp += 1
        elif et == 0x0800:
            ipv4 += 1
            if first_ipv4 is None:
                ihl = (f[14] & 0xf) * 4 if len(f) > 14 else 20
                seq = None
                if len(f) >= 14 + ihl + 12 and f[14 + 9] == 17:
                    seq = struct.unpack("!I", f[14 + ihl + 8:14 + ihl + 12])[0]
                first_ipv4 = {"t": now, "udp_seq": seq}
            if ipv4 % 100 == 0:
                print("TAP_IPV4 %d" % ipv4, flush=True)
    drops = None
    try:
        st = s.getsockopt(263, 6, 8)  # SOL_PACKET, PACKET_STATISTICS: packets, drops
        drops = struct.unpack("II", st)[1]
    except OSError:
        pass
    out({"first": first, "rarp": rarp, "ipv4": ipv4, "first_ipv4": first_ipv4, "drops": drops,
         "src_after": src_after})


def main(argv):
    mode = argv[1]
    a = argv[2:]
    if mode == "arp":
        arp(a[0], a[1], a[2], float(a[3]))
    elif mode == "udp":
        udp(a[0], int(a[1]), int(a[2]), int(a[3]), float(a[4]), len(a) > 5 and a[5] == "df")
    elif mode == "fenced":
        fenced(a[0], int(a[1]), int(a[2]), float(a[3]))
    elif mode == "icmp":
        icmp(a[0], int(a[1]), float(a[2]))
    elif mode == "stream":
        stream(a[0], int(a[1]), float(a[2]), a[3], float(a[4]))
    elif mode == "burst":
        burst(a[0], int(a[1]), int(a[2]), a[3], float(a[4]))
    elif mode == "capture":
        capture(a[0], int(a[1], 0), a[2], a[3], float(a[4]))
    elif mode == "migwatch":
        migwatch(a[0], a[1], a[2], float(a[3]), a[4] if len(a) > 4 else None)
    else:
        raise SystemExit("unknown mode " + mode)


if __name__ == "__main__":
    main(sys.argv)
