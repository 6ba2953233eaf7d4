//! The proxy's sockets: bound to the wildcard address of one family and to the loopback device,
//! so they receive queries sent to any loopback address (`127.53.x.y`) and nothing from the
//! network; UDP with `IP_PKTINFO` / `IPV6_RECVPKTINFO` to learn each datagram's destination and
//! to answer from it.
//!
//! Facts this relies on (Linux; proven by the tests in `engine/tests/dns_proxy.rs`):
//! - the whole of `127.0.0.0/8` is a local route on `lo`, so a socket bound to `0.0.0.0:P`
//!   receives datagrams and connections for every `127.x.y.z:P`;
//! - `SO_BINDTODEVICE lo` restricts that socket to packets that arrived on `lo`: traffic from
//!   the network never reaches the proxy;
//! - `IP_PKTINFO` on receive gives the datagram's destination (`ipi_addr`), and on send with
//!   `ipi_spec_dst` set makes the reply's source that address, which a client with a connected
//!   UDP socket (glibc's stub, dig) insists on;
//! - a TCP connection accepted on `0.0.0.0:P` has the address the client connected to as its
//!   `local_addr()`, and replies leave from it.

use std::io::{self, IoSlice, IoSliceMut};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::AsRawFd;

use nix::sys::socket::{
    ControlMessage, ControlMessageOwned, MsgFlags, SockaddrIn, SockaddrIn6, recvmsg, sendmsg, setsockopt, sockopt,
};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::Interest;
use tokio::net::UdpSocket;

/// A received datagram.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Datagram {
    /// Its length in the buffer.
    pub len: usize,
    /// Who sent it.
    pub client: SocketAddr,
    /// The address it was sent to.
    pub local: SocketAddr,
}

/// A UDP socket that knows each datagram's destination and answers from it.
#[derive(Debug)]
pub(crate) struct PktUdp {
    socket: UdpSocket,
    port: u16,
}

fn base_socket(addr: SocketAddr, ty: Type, protocol: Protocol, device: Option<&str>) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), ty, Some(protocol))?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.set_cloexec(true)?;
    if let Some(device) = device {
        socket.bind_device(Some(device.as_bytes()))?;
    }
    Ok(socket)
}

impl PktUdp {
    /// Binds `addr` (a wildcard address and a port, 0 for any) on `device`.
    pub fn bind(addr: SocketAddr, device: Option<&str>) -> io::Result<PktUdp> {
        let socket = base_socket(addr, Type::DGRAM, Protocol::UDP, device)?;
        match addr {
            SocketAddr::V4(_) => setsockopt(&socket, sockopt::Ipv4PacketInfo, &true)?,
            SocketAddr::V6(_) => setsockopt(&socket, sockopt::Ipv6RecvPacketInfo, &true)?,
        }
        socket.bind(&addr.into())?;
        let port = socket.local_addr()?.as_socket().map_or(0, |a| a.port());
        Ok(PktUdp { socket: UdpSocket::from_std(socket.into())?, port })
    }

    /// The bound port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Receives one datagram into `buf`.
    pub async fn recv(&self, buf: &mut [u8]) -> io::Result<Datagram> {
        let (port, fd) = (self.port, self.socket.as_raw_fd());
        self.socket.async_io(Interest::READABLE, || recv_pktinfo(fd, buf, port)).await
    }

    /// Sends `data` to `to` from the local address `from`.
    pub async fn send(&self, data: &[u8], to: SocketAddr, from: IpAddr) -> io::Result<()> {
        let fd = self.socket.as_raw_fd();
        self.socket.async_io(Interest::WRITABLE, || send_pktinfo(fd, data, to, from)).await
    }
}

fn recv_pktinfo(fd: i32, buf: &mut [u8], port: u16) -> io::Result<Datagram> {
    let mut cmsg = nix::cmsg_space!(libc::in6_pktinfo, libc::in_pktinfo);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = recvmsg::<nix::sys::socket::SockaddrStorage>(fd, &mut iov, Some(&mut cmsg), MsgFlags::MSG_DONTWAIT)?;
    let len = msg.bytes;
    let client = match msg.address {
        Some(addr) => {
            if let Some(v4) = addr.as_sockaddr_in() {
                SocketAddr::V4(SocketAddrV4::from(*v4))
            } else if let Some(v6) = addr.as_sockaddr_in6() {
                SocketAddr::V6(SocketAddrV6::from(*v6))
            } else {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "datagram from a non-IP address"));
            }
        }
        None => return Err(io::Error::new(io::ErrorKind::InvalidData, "datagram without a source address")),
    };
    let mut local = None;
    for message in msg.cmsgs()? {
        match message {
            ControlMessageOwned::Ipv4PacketInfo(info) => {
                let ip = Ipv4Addr::from(u32::from_be(info.ipi_addr.s_addr));
                local = Some(SocketAddr::V4(SocketAddrV4::new(ip, port)));
            }
            ControlMessageOwned::Ipv6PacketInfo(info) => {
                let ip = Ipv6Addr::from(info.ipi6_addr.s6_addr);
                local = Some(SocketAddr::V6(SocketAddrV6::new(ip, port, 0, 0)));
            }
            _ => {}
        }
    }
    let local = local.ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "datagram without packet info"))?;
    Ok(Datagram { len, client, local })
}

fn send_pktinfo(fd: i32, data: &[u8], to: SocketAddr, from: IpAddr) -> io::Result<()> {
    let iov = [IoSlice::new(data)];
    let sent = match (to, from) {
        (SocketAddr::V4(to), IpAddr::V4(from)) => {
            let info = libc::in_pktinfo {
                ipi_ifindex: 0,
                ipi_spec_dst: libc::in_addr { s_addr: u32::from(from).to_be() },
                ipi_addr: libc::in_addr { s_addr: 0 },
            };
            let cmsg = [ControlMessage::Ipv4PacketInfo(&info)];
            sendmsg(fd, &iov, &cmsg, MsgFlags::MSG_DONTWAIT, Some(&SockaddrIn::from(to)))?
        }
        (SocketAddr::V6(to), IpAddr::V6(from)) => {
            let info = libc::in6_pktinfo { ipi6_addr: libc::in6_addr { s6_addr: from.octets() }, ipi6_ifindex: 0 };
            let cmsg = [ControlMessage::Ipv6PacketInfo(&info)];
            sendmsg(fd, &iov, &cmsg, MsgFlags::MSG_DONTWAIT, Some(&SockaddrIn6::from(to)))?
        }
        _ => return Err(io::Error::new(io::ErrorKind::InvalidInput, "reply and source of different families")),
    };
    if sent == data.len() { Ok(()) } else { Err(io::Error::new(io::ErrorKind::WriteZero, "short datagram send")) }
}

/// A TCP listener bound to `addr` on `device`.
pub(crate) fn tcp_listener(addr: SocketAddr, device: Option<&str>) -> io::Result<tokio::net::TcpListener> {
    let socket = base_socket(addr, Type::STREAM, Protocol::TCP, device)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    tokio::net::TcpListener::from_std(socket.into())
}
