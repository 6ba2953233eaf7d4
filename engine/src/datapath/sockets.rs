//! The machine's open TCP and UDP sockets, through sock_diag (`NETLINK_SOCK_DIAG`): listed with
//! the cgroup each was created in, looked up one by one, and closed (`SOCK_DESTROY`, which the
//! kernel offers to `CAP_NET_ADMIN`). Only the network namespace of the caller is seen.
use std::io;
use std::net::SocketAddr;

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload, NetlinkSerializable, Nla,
};
use netlink_packet_sock_diag::{
    SockDiagMessage,
    constants::{AF_INET, AF_INET6, IPPROTO_TCP, IPPROTO_UDP},
    inet::{ExtensionFlags, InetRequest, InetResponse, SocketId, StateFlags, nlas::Nla as InetNla},
    message::SockDiagDestroy,
};
use netlink_sys::{Socket, SocketAddr as NetlinkAddr, protocols::NETLINK_SOCK_DIAG};

/// `INET_DIAG_CGROUP_ID`: the id of the cgroup a socket was created in (Linux 5.7+).
const INET_DIAG_CGROUP_ID: u16 = 21;
/// `TCP_LISTEN`, as sock_diag reports a listening socket's state.
pub const TCP_LISTEN: u8 = 10;
/// `TCP_ESTABLISHED`: a connected TCP socket, or a connected UDP socket.
pub const TCP_ESTABLISHED: u8 = 1;

/// One open socket, as sock_diag reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InetSocket {
    /// `IPPROTO_TCP` or `IPPROTO_UDP`.
    pub protocol: u8,
    /// `AF_INET` or `AF_INET6`.
    pub family: u8,
    /// The TCP state (`TCP_*`); a UDP socket is `TCP_ESTABLISHED` when connected.
    pub state: u8,
    /// Its local address.
    pub local: SocketAddr,
    /// Its peer (unspecified, port 0, for a listener or an unconnected UDP socket).
    pub remote: SocketAddr,
    /// The kernel's socket cookie.
    pub cookie: u64,
    /// The cgroup it was created in, when the kernel says (full sockets, Linux 5.7+).
    pub cgroup_id: Option<u64>,
    /// No process holds it any more: closed, and the kernel finishing the close (sock_diag
    /// reports no inode).
    pub orphan: bool,
    id: SocketId,
}

impl InetSocket {
    fn from_response(protocol: u8, response: &InetResponse) -> Self {
        let id = response.header.socket_id.clone();
        // Two native-endian u32s, low half first (sock_diag_save_cookie).
        let [a, b, c, d, e, f, g, h] = id.cookie;
        let cookie = u64::from(u32::from_ne_bytes([a, b, c, d])) | u64::from(u32::from_ne_bytes([e, f, g, h])) << 32;
        let cgroup_id = response.nlas.iter().find_map(|nla| match nla {
            InetNla::Other(other) if other.kind() == INET_DIAG_CGROUP_ID && other.value_len() == 8 => {
                let mut value = [0u8; 8];
                other.emit_value(&mut value);
                Some(u64::from_ne_bytes(value))
            }
            _ => None,
        });
        Self {
            protocol,
            family: response.header.family,
            state: response.header.state,
            local: SocketAddr::new(id.source_address, id.source_port),
            remote: SocketAddr::new(id.destination_address, id.destination_port),
            cookie,
            cgroup_id,
            orphan: response.header.inode == 0,
            id,
        }
    }
}

/// A sock_diag netlink socket.
pub struct SockDiag {
    socket: Socket,
    sequence: u32,
    buffer: Vec<u8>,
}

impl SockDiag {
    /// Opens a sock_diag socket.
    pub fn open() -> io::Result<Self> {
        let mut socket = Socket::new(NETLINK_SOCK_DIAG)?;
        socket.bind_auto()?;
        socket.connect(&NetlinkAddr::new(0, 0))?;
        Ok(Self { socket, sequence: 0, buffer: vec![0; 64 * 1024] })
    }

    fn send<T: NetlinkSerializable>(&mut self, flags: u16, payload: T) -> io::Result<u32>
    where
        NetlinkPayload<T>: From<T>,
    {
        self.sequence = self.sequence.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = flags;
        header.sequence_number = self.sequence;
        let mut message = NetlinkMessage::new(header, payload.into());
        message.finalize();
        let mut bytes = vec![0; message.buffer_len()];
        message.serialize(&mut bytes);
        self.socket.send(&bytes, 0)?;
        Ok(self.sequence)
    }

    /// Reads replies to request `sequence` until `done` says so; `each` gets every socket.
    fn receive(&mut self, sequence: u32, protocol: u8, mut each: impl FnMut(InetSocket)) -> io::Result<()> {
        loop {
            let size = self.socket.recv(&mut &mut self.buffer[..], 0)?;
            let mut bytes = self.buffer.get(..size).unwrap_or_default();
            while !bytes.is_empty() {
                let message = <NetlinkMessage<SockDiagMessage>>::deserialize(bytes).map_err(io::Error::other)?;
                let length = (message.header.length as usize).clamp(1, bytes.len());
                bytes = bytes.get(length..).unwrap_or_default();
                if message.header.sequence_number != sequence {
                    continue;
                }
                match message.payload {
                    NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(response)) => {
                        each(InetSocket::from_response(protocol, &response));
                        if message.header.flags & netlink_packet_core::NLM_F_MULTIPART == 0 {
                            return Ok(());
                        }
                    }
                    NetlinkPayload::Done(_) => return Ok(()),
                    NetlinkPayload::Error(error) => {
                        return match error.code {
                            None => Ok(()),
                            Some(code) => Err(io::Error::from_raw_os_error(-code.get())),
                        };
                    }
                    _ => {}
                }
            }
        }
    }

    /// Every socket of `protocol` (TCP or UDP) and `family` in this network namespace, in any
    /// state but the short-lived ones that are no full socket (SYN-RECV, TIME-WAIT).
    pub fn dump(&mut self, family: u8, protocol: u8) -> io::Result<Vec<InetSocket>> {
        let states = StateFlags::all() - StateFlags::SYN_RECV - StateFlags::TIME_WAIT;
        let socket_id = if family == AF_INET6 { SocketId::new_v6() } else { SocketId::new_v4() };
        let request = InetRequest { family, protocol, extensions: ExtensionFlags::empty(), states, socket_id };
        let sequence = self.send(NLM_F_REQUEST | NLM_F_DUMP, SockDiagMessage::InetRequest(request))?;
        let mut out = Vec::new();
        self.receive(sequence, protocol, |s| out.push(s))?;
        Ok(out)
    }

    /// Every TCP and UDP socket, IPv4 and IPv6, in this network namespace.
    pub fn all(&mut self) -> io::Result<Vec<InetSocket>> {
        let mut out = Vec::new();
        for protocol in [IPPROTO_TCP, IPPROTO_UDP] {
            for family in [AF_INET, AF_INET6] {
                out.extend(self.dump(family, protocol)?);
            }
        }
        Ok(out)
    }

    /// The one socket of `protocol` with `source` and `destination` as sock_diag names its ends
    /// (for UDP the kernel looks up the receiver of a datagram from `source` to `destination`),
    /// asked over IPv6 (IPv4 sockets answer as IPv4-mapped). None when there is no such socket.
    pub fn find(
        &mut self,
        protocol: u8,
        source: SocketAddr,
        destination: SocketAddr,
    ) -> io::Result<Option<InetSocket>> {
        let request = InetRequest {
            family: AF_INET6,
            protocol,
            extensions: ExtensionFlags::empty(),
            states: StateFlags::all(),
            socket_id: SocketId {
                source_port: source.port(),
                destination_port: destination.port(),
                source_address: source.ip(),
                destination_address: destination.ip(),
                interface_id: 0,
                // INET_DIAG_NOCOOKIE: match by addresses alone.
                cookie: [0xff; 8],
            },
        };
        let sequence = self.send(NLM_F_REQUEST, SockDiagMessage::InetRequest(request))?;
        let mut found = None;
        match self.receive(sequence, protocol, |s| found = Some(s)) {
            Ok(()) => Ok(found),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Closes `socket` (`SOCK_DESTROY`): its owner's next call fails with `ECONNABORTED`. A
    /// socket already gone is not an error.
    pub fn destroy(&mut self, socket: &InetSocket) -> io::Result<()> {
        let request = InetRequest {
            family: socket.family,
            protocol: socket.protocol,
            extensions: ExtensionFlags::empty(),
            states: StateFlags::all(),
            socket_id: socket.id.clone(),
        };
        let destroy = SockDiagDestroy::new(SockDiagMessage::InetRequest(request));
        let sequence = self.send(NLM_F_REQUEST | NLM_F_ACK, destroy)?;
        match self.receive(sequence, socket.protocol, drop) {
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
            other => other,
        }
    }
}
