#!/usr/bin/env python3
"""Maps a BPF function's sampled offsets to its source lines.

usage: lines.py PROGRAM SYMBOL OFFSETS [TOP]

PROGRAM   the loaded program's name (bpftool prog show)
SYMBOL    the JITed function sampled: bpf_prog_<tag>_<name> as /proc/kallsyms and perf name it,
          the program itself or one of its subprograms
OFFSETS   lines "HEXOFFSET COUNT": samples at SYMBOL + offset (perf script -F symoff)

Finds SYMBOL's start in /proc/kallsyms and, among the loaded programs named PROGRAM, the one
whose functions start there; reads its jited line info (the JIT address of each BTF line record)
with BPF_OBJ_GET_INFO_BY_FD and its BTF's strings, and sums each sample into the last line
record at or before it.
"""
import bisect
import collections
import ctypes
import os
import re
import struct
import sys

SYS_BPF = 321  # x86_64
BPF_PROG_GET_NEXT_ID, BPF_PROG_GET_FD_BY_ID, BPF_OBJ_GET_INFO_BY_FD = 11, 13, 15
BPF_BTF_GET_FD_BY_ID = 19
INFO_SIZE = 232  # struct bpf_prog_info up to attach_btf_id
libc = ctypes.CDLL(None, use_errno=True)


def bpf(cmd, attr, check=True):
    buf = ctypes.create_string_buffer(attr, 128)
    fd = libc.syscall(SYS_BPF, cmd, buf, 128)
    if fd < 0 and check:
        err = ctypes.get_errno()
        sys.exit(f"bpf({cmd}): {os.strerror(err)}")
    return fd, buf


def obj_info(fd, buf):
    bpf(BPF_OBJ_GET_INFO_BY_FD, struct.pack("<IIQ", fd, len(buf), ctypes.addressof(buf)))


def programs(name):
    """The fds of the loaded programs called name (the kernel keeps 15 bytes of it)."""
    prog_id = 0
    while True:
        ret, buf = bpf(BPF_PROG_GET_NEXT_ID, struct.pack("<I", prog_id), check=False)
        if ret < 0:
            return
        prog_id, = struct.unpack_from("<I", buf.raw, 4)
        fd, _ = bpf(BPF_PROG_GET_FD_BY_ID, struct.pack("<I", prog_id), check=False)
        if fd < 0:
            continue
        info = ctypes.create_string_buffer(INFO_SIZE)
        obj_info(fd, info)
        if info.raw[64:80].split(b"\0")[0].decode() == name[:15]:
            yield fd
        else:
            os.close(fd)


def main():
    prog, sym, offsets = sys.argv[1], sys.argv[2], sys.argv[3]
    top = int(sys.argv[4]) if len(sys.argv) > 4 else 40
    base = None
    with open("/proc/kallsyms") as f:
        for entry in f:
            addr, _, name = entry.split()[:3]
            if name == sym:
                base = int(addr, 16)
    if base is None:
        sys.exit(f"no symbol {sym} in /proc/kallsyms (is bpf_jit_kallsyms 1?)")
    for fd in programs(prog):
        info = ctypes.create_string_buffer(INFO_SIZE)
        obj_info(fd, info)
        nr_ksyms, = struct.unpack_from("<I", info.raw, 104)
        ksyms = ctypes.create_string_buffer(8 * nr_ksyms)
        # A fresh buffer: the kernel copies out every array whose length it is given.
        info = ctypes.create_string_buffer(INFO_SIZE)
        struct.pack_into("<IIQ", info, 104, nr_ksyms, 0, ctypes.addressof(ksyms))
        obj_info(fd, info)
        starts = sorted(struct.unpack(f"<{nr_ksyms}Q", ksyms.raw))
        if base in starts:
            break
    else:
        sys.exit(f"no loaded program {prog} holds {sym}")
    info = ctypes.create_string_buffer(INFO_SIZE)
    obj_info(fd, info)
    btf_id, = struct.unpack_from("<I", info.raw, 128)
    nr_lines, = struct.unpack_from("<I", info.raw, 148)
    nr_jited_lines, = struct.unpack_from("<I", info.raw, 168)
    line_rec, = struct.unpack_from("<I", info.raw, 172)
    if nr_lines == 0 or nr_jited_lines != nr_lines:
        sys.exit("the program has no (jited) line info")
    lines = ctypes.create_string_buffer(line_rec * nr_lines)
    jited = ctypes.create_string_buffer(8 * nr_lines)
    info = ctypes.create_string_buffer(INFO_SIZE)
    struct.pack_into("<II", info, 148, nr_lines, 0)
    struct.pack_into("<QQ", info, 152, ctypes.addressof(lines), ctypes.addressof(jited))
    struct.pack_into("<III", info, 168, nr_lines, line_rec, 8)
    obj_info(fd, info)
    end = next((s for s in starts if s > base), 1 << 64)

    # The BTF's string section holds file names and source lines.
    bfd, _ = bpf(BPF_BTF_GET_FD_BY_ID, struct.pack("<I", btf_id))
    binfo = ctypes.create_string_buffer(32)
    obj_info(bfd, binfo)
    size, = struct.unpack_from("<I", binfo.raw, 8)
    data = ctypes.create_string_buffer(size)
    struct.pack_into("<QI", binfo, 0, ctypes.addressof(data), size)
    obj_info(bfd, binfo)
    hdr_len, _, _, str_off, str_len = struct.unpack_from("<IIIII", data.raw, 4)
    strs = data.raw[hdr_len + str_off:hdr_len + str_off + str_len]

    def string(off):
        return strs[off:strs.index(b"\0", off)].decode(errors="replace")

    addrs = struct.unpack(f"<{nr_lines}Q", jited.raw)
    recs = []
    for i in range(nr_lines):
        _, file_off, line_off, col = struct.unpack_from("<IIII", lines.raw, i * line_rec)
        if base <= addrs[i] < end:
            where = f"{string(file_off).split('/')[-1]}:{col >> 10}"
            recs.append((addrs[i] - base, where, string(line_off).strip()[:90]))
    recs.sort()
    at = [r[0] for r in recs]

    samples = collections.Counter()
    total = 0
    with open(offsets) as f:
        for entry in f:
            off, n = entry.split()
            total += int(n)
            i = bisect.bisect_right(at, int(off, 16)) - 1
            if i >= 0:
                samples[recs[i][1:]] += int(n)
    print(f"{total} samples in {sym}")
    for (where, text), n in samples.most_common(top):
        print(f"{100 * n / max(total, 1):5.1f}% {n:6d}  {where:<22} {text}")


if __name__ == "__main__":
    main()
