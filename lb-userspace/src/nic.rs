//! What the agent checks about an uplink before attaching: its driver, MTU and channels
//! (ethtool), and whether native XDP can work with them. On AWS, ENA takes a native XDP program
//! only with an MTU of at most 3498 and with at most half of its channels in use (XDP needs its
//! own transmit queues); otherwise attaching falls back to generic XDP, which is correct but
//! much slower. Saying so at start saves an operator the guessing.
use std::{ffi::CString, fmt::Write as _, os::fd::AsRawFd};

/// ENA's largest MTU with an XDP program (a 4 KiB page minus headroom and skb overhead).
pub const ENA_XDP_MAX_MTU: u32 = 3498;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Nic {
    pub name: String,
    /// ethtool's driver name ("ena", "virtio_net", "veth", ...), if the device reports one.
    pub driver: Option<String>,
    pub mtu: u32,
    /// Combined channels (queue pairs): (in use, maximum).
    pub channels: Option<(u32, u32)>,
}

impl Nic {
    /// Reads the driver and channels of `name`; `mtu` comes from netlink.
    pub fn inspect(name: &str, mtu: u32) -> Nic {
        let (driver, channels) = match Ethtool::open() {
            Ok(e) => (e.driver(name), e.channels(name)),
            Err(_) => (None, None),
        };
        Nic {
            name: name.to_string(),
            driver,
            mtu,
            channels,
        }
    }

    /// "driver ena, MTU 9001, 8 of 8 channels".
    pub fn describe(&self) -> String {
        let mut s = format!(
            "driver {}, MTU {}",
            self.driver.as_deref().unwrap_or("unknown"),
            self.mtu
        );
        if let Some((used, max)) = self.channels {
            let _ = write!(s, ", {used} of {max} channels");
        }
        s
    }

    /// Why native XDP will not attach on this device, and what to do, when that is known.
    pub fn native_xdp_obstacles(&self) -> Vec<String> {
        let mut out = Vec::new();
        match self.driver.as_deref() {
            Some("ena") => {
                if self.mtu > ENA_XDP_MAX_MTU {
                    out.push(format!(
                        "ENA takes native XDP only with an MTU of at most {ENA_XDP_MAX_MTU} (this one is {}): lower it (and AWS_VPC_ENI_MTU on the VPC CNI)",
                        self.mtu
                    ));
                }
                if let Some((used, max)) = self.channels
                    && used > max / 2
                {
                    out.push(format!(
                        "ENA takes native XDP only with at most half its channels in use ({used} of {max}): ethtool -L {} combined {}",
                        self.name,
                        max / 2
                    ));
                }
            }
            Some("virtio_net") => {
                if let Some((used, max)) = self.channels
                    && used * 2 > max
                {
                    out.push(format!(
                        "virtio_net needs a spare transmit queue per CPU for XDP ({used} of {max} channels in use): ethtool -L {} combined {}",
                        self.name,
                        max / 2
                    ));
                }
            }
            _ => {}
        }
        out
    }
}

/// An AF_INET socket for SIOCETHTOOL requests, in the namespace of the thread that opened it.
pub(crate) struct Ethtool(std::os::fd::OwnedFd);

const SIOCETHTOOL: libc::c_ulong = 0x8946;
const ETHTOOL_GDRVINFO: u32 = 0x03;
const ETHTOOL_GGRO: u32 = 0x2b;
const ETHTOOL_SGRO: u32 = 0x2c;
const ETHTOOL_GCHANNELS: u32 = 0x3c;

/// `struct ethtool_value`.
#[repr(C)]
struct Value {
    cmd: u32,
    data: u32,
}

#[repr(C)]
#[derive(Default)]
struct DrvInfo {
    cmd: u32,
    driver: [u8; 32],
    version: [u8; 32],
    fw_version: [u8; 32],
    bus_info: [u8; 32],
    erom_version: [u8; 32],
    reserved2: [u8; 12],
    n_priv_flags: u32,
    n_stats: u32,
    testinfo_len: u32,
    eedump_len: u32,
    regdump_len: u32,
}

#[repr(C)]
#[derive(Default)]
struct Channels {
    cmd: u32,
    max_rx: u32,
    max_tx: u32,
    max_other: u32,
    max_combined: u32,
    rx_count: u32,
    tx_count: u32,
    other_count: u32,
    combined_count: u32,
}

/// `struct ifreq`: the name, then a 24-byte union of which ethtool uses the pointer.
#[repr(C)]
struct IfReq {
    name: [libc::c_char; libc::IFNAMSIZ],
    data: *mut libc::c_void,
    _pad: [u8; 16],
}

impl Ethtool {
    pub(crate) fn open() -> std::io::Result<Ethtool> {
        use nix::sys::socket::{AddressFamily, SockFlag, SockType, socket};
        let fd = socket(
            AddressFamily::Inet,
            SockType::Datagram,
            SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        Ok(Ethtool(fd))
    }

    /// SIOCETHTOOL with `data` (whose first field is the command).
    fn request<T>(&self, name: &str, data: &mut T) -> bool {
        let Ok(cname) = CString::new(name) else {
            return false;
        };
        let bytes = cname.as_bytes_with_nul();
        if bytes.len() > libc::IFNAMSIZ {
            return false;
        }
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            data: std::ptr::from_mut::<T>(data).cast(),
            _pad: [0; 16],
        };
        for (d, s) in req.name.iter_mut().zip(bytes) {
            *d = libc::c_char::from_ne_bytes([*s]);
        }
        // SAFETY: `req` points at a live, correctly laid out ethtool structure.
        unsafe { libc::ioctl(self.0.as_raw_fd(), SIOCETHTOOL, &mut req) == 0 }
    }

    fn driver(&self, name: &str) -> Option<String> {
        let mut info = DrvInfo {
            cmd: ETHTOOL_GDRVINFO,
            ..DrvInfo::default()
        };
        if !self.request(name, &mut info) {
            return None;
        }
        let end = info.driver.iter().position(|b| *b == 0).unwrap_or(32);
        let driver = String::from_utf8_lossy(&info.driver[..end]).into_owned();
        (!driver.is_empty()).then_some(driver)
    }

    /// Whether GRO is on; `None` if the device does not say.
    pub(crate) fn gro(&self, name: &str) -> Option<bool> {
        let mut v = Value {
            cmd: ETHTOOL_GGRO,
            data: 0,
        };
        self.request(name, &mut v).then_some(v.data != 0)
    }

    pub(crate) fn set_gro(&self, name: &str, on: bool) -> std::io::Result<()> {
        let mut v = Value {
            cmd: ETHTOOL_SGRO,
            data: u32::from(on),
        };
        if self.request(name, &mut v) {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }

    fn channels(&self, name: &str) -> Option<(u32, u32)> {
        let mut ch = Channels {
            cmd: ETHTOOL_GCHANNELS,
            ..Channels::default()
        };
        (self.request(name, &mut ch) && ch.max_combined > 0)
            .then_some((ch.combined_count, ch.max_combined))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ena(mtu: u32, used: u32, max: u32) -> Nic {
        Nic {
            name: "eth0".into(),
            driver: Some("ena".into()),
            mtu,
            channels: Some((used, max)),
        }
    }

    #[test]
    fn ena_limits_are_named_with_the_fix() {
        assert!(ena(3498, 4, 8).native_xdp_obstacles().is_empty());
        let o = ena(9001, 8, 8).native_xdp_obstacles();
        assert_eq!(o.len(), 2, "{o:?}");
        assert!(o[0].contains("at most 3498 (this one is 9001)"), "{o:?}");
        assert!(o[1].contains("ethtool -L eth0 combined 4"), "{o:?}");
        assert_eq!(
            ena(9001, 8, 8).describe(),
            "driver ena, MTU 9001, 8 of 8 channels"
        );
    }

    #[test]
    fn loopback_has_a_driver_name_or_none_but_never_fails() {
        // lo reports no driver through ethtool on some kernels; either way this must not panic.
        let nic = Nic::inspect("lo", 65536);
        assert!(nic.native_xdp_obstacles().is_empty());
        assert!(Nic::inspect("no-such-device-x", 1500).driver.is_none());
    }
}
