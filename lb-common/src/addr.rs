//! The one address type: 16 bytes in network byte order, IPv4 stored IPv4-mapped
//! (`::ffff:a.b.c.d`) so one key type serves both families and they cannot collide.
//!
//! It is 4-byte aligned and the data path handles it as four 32-bit words (`w`, each word's
//! bytes in memory order): BPF has no byte-to-word merging for unaligned data, so byte-wise
//! handling would cost ~4x the instructions on every copy, compare and checksum update.

#[repr(C, align(4))]
#[derive(Clone, Copy, Default, PartialOrd, Ord)]
pub struct Addr(pub [u8; 16]);
const _: () = assert!(core::mem::size_of::<Addr>() == 16);

impl Addr {
    pub const ZERO: Addr = Addr([0; 16]);

    /// An IPv4 address (network byte order) IPv4-mapped.
    #[inline(always)]
    pub const fn v4(a: [u8; 4]) -> Addr {
        Addr([
            0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, a[0], a[1], a[2], a[3],
        ])
    }

    /// From four memory-order words (what `w` returns).
    #[inline(always)]
    pub fn from_words(w: [u32; 4]) -> Addr {
        let mut a = Addr::ZERO;
        a.set_words(w);
        a
    }

    /// The four words, each holding four bytes in memory order.
    #[inline(always)]
    #[allow(
        clippy::cast_ptr_alignment,
        reason = "Addr is repr(align(4)): its bytes start on a word boundary"
    )]
    pub fn words(&self) -> [u32; 4] {
        let p = self.0.as_ptr().cast::<u32>();
        // SAFETY: Addr is 4-aligned and 16 bytes long.
        unsafe { [p.read(), p.add(1).read(), p.add(2).read(), p.add(3).read()] }
    }

    #[inline(always)]
    #[allow(
        clippy::cast_ptr_alignment,
        reason = "Addr is repr(align(4)): its bytes start on a word boundary"
    )]
    pub fn set_words(&mut self, w: [u32; 4]) {
        let p = self.0.as_mut_ptr().cast::<u32>();
        // SAFETY: as in `words`.
        unsafe {
            p.write(w[0]);
            p.add(1).write(w[1]);
            p.add(2).write(w[2]);
            p.add(3).write(w[3]);
        }
    }

    /// The last word: the IPv4 address of an IPv4-mapped address, in memory order.
    #[inline(always)]
    pub fn v4_word(&self) -> u32 {
        self.words()[3]
    }

    #[inline(always)]
    pub fn is_v4(&self) -> bool {
        let w = self.words();
        w[0] == 0 && w[1] == 0 && w[2] == V4_MAPPED_WORD
    }

    #[inline(always)]
    pub fn is_zero(&self) -> bool {
        let w = self.words();
        (w[0] | w[1] | w[2] | w[3]) == 0
    }

    /// The IPv4 bytes of an IPv4-mapped address.
    #[inline(always)]
    pub const fn v4_bytes(&self) -> [u8; 4] {
        [self.0[12], self.0[13], self.0[14], self.0[15]]
    }
}

impl Addr {
    /// Whether a packet from this address may be a client's: a unicast host address. Not
    /// IPv4 0.0.0.0/8, 127.0.0.0/8, 169.254.0.0/16 (link-local: never forwarded), 224.0.0.0/4
    /// (multicast), 240.0.0.0/4 (class E and the limited broadcast); not IPv6 ::, ::1,
    /// fe80::/10, ff00::/8. The node's own addresses, VIPs and subnet broadcasts are the
    /// data path's LB_ADDRS; an IPv6 packet from an IPv4-mapped address is caught by the parser.
    #[inline(always)]
    pub fn may_be_client(&self) -> bool {
        let b = &self.0;
        if self.is_v4() {
            let (a, n) = (b[12], b[13]);
            !(a == 0 || a == 127 || a >= 224 || (a == 169 && n == 254))
        } else {
            let w = self.words();
            let unspecified_or_loopback = (w[0] | w[1] | w[2]) == 0
                && (w[3] == 0 || w[3] == u32::from_ne_bytes([0, 0, 0, 1]));
            !(unspecified_or_loopback || b[0] == 0xff || (b[0] == 0xfe && b[1] & 0xc0 == 0x80))
        }
    }
}

/// Word 2 of every IPv4-mapped address (bytes 00 00 ff ff in memory order).
pub const V4_MAPPED_WORD: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

/// By words: an array `==` may become a memcmp call, which BPF does not have.
impl PartialEq for Addr {
    #[inline(always)]
    fn eq(&self, other: &Self) -> bool {
        let (a, b) = (self.words(), other.words());
        ((a[0] ^ b[0]) | (a[1] ^ b[1]) | (a[2] ^ b[2]) | (a[3] ^ b[3])) == 0
    }
}
impl Eq for Addr {}

impl core::hash::Hash for Addr {
    fn hash<H: core::hash::Hasher>(&self, state: &mut H) {
        self.0.hash(state);
    }
}

impl core::fmt::Debug for Addr {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        if self.is_v4() {
            write!(f, "{}", core::net::Ipv4Addr::from(self.v4_bytes()))
        } else {
            write!(f, "{}", core::net::Ipv6Addr::from(self.0))
        }
    }
}

impl core::fmt::Display for Addr {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        core::fmt::Debug::fmt(self, f)
    }
}

impl From<core::net::IpAddr> for Addr {
    fn from(ip: core::net::IpAddr) -> Addr {
        match ip {
            core::net::IpAddr::V4(v4) => Addr::v4(v4.octets()),
            core::net::IpAddr::V6(v6) => Addr(v6.octets()),
        }
    }
}

impl From<Addr> for core::net::IpAddr {
    fn from(a: Addr) -> core::net::IpAddr {
        if a.is_v4() {
            core::net::IpAddr::V4(core::net::Ipv4Addr::from(a.v4_bytes()))
        } else {
            core::net::IpAddr::V6(core::net::Ipv6Addr::from(a.0))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::net::IpAddr;

    fn a(s: &str) -> Addr {
        Addr::from(s.parse::<IpAddr>().unwrap())
    }

    #[test]
    fn only_unicast_host_addresses_may_be_clients() {
        for ok in [
            "10.0.0.10",
            "1.1.1.1",
            "169.253.1.1",
            "223.255.255.254",
            "fd00::10",
            "2001:db8::1",
            "fe00::1",
            "::2",
        ] {
            assert!(a(ok).may_be_client(), "{ok}");
        }
        for bad in [
            "0.0.0.0",
            "0.1.2.3",
            "127.0.0.1",
            "169.254.1.1",
            "224.0.0.1",
            "239.255.255.255",
            "240.0.0.1",
            "255.255.255.255",
            "::",
            "::1",
            "ff02::1",
            "fe80::1",
            "febf::1",
        ] {
            assert!(!a(bad).may_be_client(), "{bad}");
        }
    }
}
