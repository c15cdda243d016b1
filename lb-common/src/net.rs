//! Wire constants: EtherTypes, header offsets, TCP flags, ICMP types, `bpf_fib_lookup` results.
//! One definition for the data path, the agent and the tests.

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_HLEN: usize = 14;

/// Byte offsets within the IPv4 header.
pub const IPV4_TOT_LEN: usize = 2;
pub const IPV4_TTL: usize = 8;
pub const IPV4_PROTO: usize = 9;
pub const IPV4_CHECK: usize = 10;
pub const IPV4_SRC: usize = 12;
pub const IPV4_DST: usize = 16;
pub const IPV4_HLEN: usize = 20;

/// Byte offsets within the IPv6 header.
pub const IPV6_PAYLOAD_LEN: usize = 4;
pub const IPV6_NEXT_HEADER: usize = 6;
pub const IPV6_HOP_LIMIT: usize = 7;
pub const IPV6_SRC: usize = 8;
pub const IPV6_DST: usize = 24;
pub const IPV6_HLEN: usize = 40;

/// TCP flag bits (byte 13 of the header).
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_PSH: u8 = 0x08;
pub const TCP_ACK: u8 = 0x10;

/// Byte offsets within the TCP and UDP headers.
pub const TCP_FLAGS: usize = 13;
pub const TCP_CHECK: usize = 16;
pub const TCP_HLEN: usize = 20;
pub const UDP_LEN: usize = 4;
pub const UDP_CHECK: usize = 6;
pub const UDP_HLEN: usize = 8;

/// ICMP and ICMPv6 types the data path handles; the header is 8 bytes, checksum at 2.
pub const ICMP_ECHO_REPLY: u8 = 0;
pub const ICMP_DEST_UNREACH: u8 = 3;
pub const ICMP_ECHO_REQUEST: u8 = 8;
pub const ICMP_FRAG_NEEDED: u8 = 4;
pub const ICMPV6_DEST_UNREACH: u8 = 1;
pub const ICMPV6_PACKET_TOO_BIG: u8 = 2;
pub const ICMPV6_ECHO_REQUEST: u8 = 128;
pub const ICMPV6_ECHO_REPLY: u8 = 129;
pub const ICMP_CHECK: usize = 2;
pub const ICMP_HLEN: usize = 8;

/// Address families as `bpf_fib_lookup` takes them.
pub const AF_INET: u8 = 2;
pub const AF_INET6: u8 = 10;

/// `bpf_fib_lookup` results (uapi `BPF_FIB_LKUP_RET_*`).
pub const FIB_SUCCESS: i64 = 0;
pub const FIB_BLACKHOLE: i64 = 1;
pub const FIB_UNREACHABLE: i64 = 2;
pub const FIB_PROHIBIT: i64 = 3;
pub const FIB_NOT_FORWARDED: i64 = 4;
pub const FIB_FWD_DISABLED: i64 = 5;
pub const FIB_UNSUPP_LWT: i64 = 6;
pub const FIB_NO_NEIGHBOUR: i64 = 7;
pub const FIB_FRAG_NEEDED: i64 = 8;
