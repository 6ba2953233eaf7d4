//! Test helper, spawned inside the cgroup under test. Makes real socket calls and prints
//! one line: `ok <n>` or `err <errno> <n_ok_before>`.
//!
//! usage: depfence-probe <tcp|udp|udpconnect|tally|tfo|threads> <ip> <port> [count]
//!   tcp         TcpStream::connect (connect4/connect6 hook)
//!   udp         unconnected UdpSocket::send_to (sendmsg4/sendmsg6 hook)
//!   udpconnect  one UDP socket, connect() `count` times (connect4/6 hook, no packets: bench)
//!   tally       `count` TCP connects that go on after failures; prints
//!               `tally <ok> <eperm> <other errors>` instead, and `errno <n> <count>` on stderr
//!               for the other errors
//!   tfo         TCP Fast Open: a fresh stream socket and one `sendto(MSG_FASTOPEN)` of 8 bytes
//!               to the destination, `count` times (the kernel connects inside sendmsg)
//!   threads     `count` threads, released together by a barrier, each makes one
//!               TcpStream::connect; `ok <count>`, or the first error (by thread index) and how
//!               many threads succeeded
//!
//! With `DEPFENCE_PROBE_PIDS=1` in the environment the line ends with
//! ` pid <pid> ppid <parent pid> gppid <grandparent pid>` (read while the probe runs).
use std::{
    io,
    net::{IpAddr, SocketAddr, TcpStream, UdpSocket},
    process::ExitCode,
    sync::{Arc, Barrier},
};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let (Some(kind), Some(ip), Some(port)) = (args.get(1), args.get(2), args.get(3)) else {
        eprintln!("usage: depfence-probe <tcp|udp|udpconnect|tally|tfo|threads> <ip> <port> [count]");
        return ExitCode::from(2);
    };
    let (Ok(ip), Ok(port)) = (ip.parse::<IpAddr>(), port.parse::<u16>()) else {
        eprintln!("bad address");
        return ExitCode::from(2);
    };
    let count: u64 = args.get(4).and_then(|c| c.parse().ok()).unwrap_or(1);
    let dst = SocketAddr::new(ip, port);
    let bind: SocketAddr = if ip.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse().unwrap_or(dst);
    let pids =
        if std::env::var_os("DEPFENCE_PROBE_PIDS").is_some_and(|v| v == "1") { pid_suffix() } else { String::new() };
    if kind == "tally" {
        let (mut ok, mut eperm, mut other) = (0u64, 0u64, std::collections::BTreeMap::<i32, u64>::new());
        for _ in 0..count {
            match TcpStream::connect(dst) {
                Ok(s) => {
                    drop(s);
                    ok += 1;
                }
                Err(e) if e.raw_os_error() == Some(1) => eperm += 1,
                Err(e) => *other.entry(e.raw_os_error().unwrap_or(-1)).or_default() += 1,
            }
        }
        // The other errors by errno, on stderr: `errno <n> <count>` per line.
        for (errno, n) in &other {
            eprintln!("errno {errno} {n}");
        }
        println!("tally {ok} {eperm} {}{pids}", other.values().sum::<u64>());
        return ExitCode::SUCCESS;
    }
    let mut ok = 0u64;
    let result = (|| -> io::Result<()> {
        match kind.as_str() {
            "tcp" => {
                for _ in 0..count {
                    drop(TcpStream::connect(dst)?);
                    ok += 1;
                }
            }
            "udp" => {
                let s = UdpSocket::bind(bind)?;
                for _ in 0..count {
                    s.send_to(b"depfence", dst)?;
                    ok += 1;
                }
            }
            "udpconnect" => {
                let s = UdpSocket::bind(bind)?;
                for _ in 0..count {
                    s.connect(dst)?;
                    ok += 1;
                }
            }
            "tfo" => {
                for _ in 0..count {
                    fast_open::send(dst, b"depfence")?;
                    ok += 1;
                }
            }
            "threads" => {
                let (n_ok, first_err) = connect_from_threads(dst, count);
                ok = n_ok;
                if let Some(e) = first_err {
                    return Err(e);
                }
            }
            _ => return Err(io::Error::other("unknown kind")),
        }
        Ok(())
    })();
    match result {
        Ok(()) => {
            println!("ok {ok}{pids}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("err {} {ok}{pids}", e.raw_os_error().unwrap_or(-1));
            ExitCode::from(1)
        }
    }
}

/// One connect from each of `n` threads at once: (successes, first error by thread index).
fn connect_from_threads(dst: SocketAddr, n: u64) -> (u64, Option<io::Error>) {
    let barrier = Arc::new(Barrier::new(usize::try_from(n).unwrap_or(usize::MAX)));
    let handles: Vec<_> = (0..n)
        .map(|_| {
            let barrier = Arc::clone(&barrier);
            std::thread::spawn(move || {
                barrier.wait();
                TcpStream::connect(dst).map(drop)
            })
        })
        .collect();
    let mut ok = 0;
    let mut first_err = None;
    for h in handles {
        match h.join() {
            Ok(Ok(())) => ok += 1,
            Ok(Err(e)) => {
                first_err.get_or_insert(e);
            }
            Err(_) => {
                first_err.get_or_insert(io::Error::other("thread panicked"));
            }
        }
    }
    (ok, first_err)
}

/// ` pid <pid> ppid <ppid> gppid <grandparent pid>`; 0 where /proc could not be read.
fn pid_suffix() -> String {
    let ppid = std::os::unix::process::parent_id();
    // /proc/<pid>/stat: `pid (comm) state ppid …`; comm may hold spaces, so split after `)`.
    let gppid = std::fs::read_to_string(format!("/proc/{ppid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok()))
        .unwrap_or(0);
    format!(" pid {} ppid {ppid} gppid {gppid}", std::process::id())
}

/// `sendto(MSG_FASTOPEN)`: std has no TCP Fast Open client, so this goes through libc.
#[expect(unsafe_code, reason = "socket(2) and sendto(2) with a sockaddr built here; std wraps neither for TFO")]
mod fast_open {
    use std::{
        io,
        net::SocketAddr,
        os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    };

    /// A fresh TCP socket of `dst`'s family; one `sendto(data, MSG_FASTOPEN, dst)`.
    /// Blocking: returns once the handshake is done (or failed), like connect().
    pub fn send(dst: SocketAddr, data: &[u8]) -> io::Result<()> {
        let family = if dst.is_ipv4() { libc::AF_INET } else { libc::AF_INET6 };
        // SAFETY: socket(2) with constant arguments; the result is checked before use.
        let fd = unsafe { libc::socket(family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a new descriptor nobody else owns; OwnedFd closes it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: all-zero bytes are a valid sockaddr_storage.
        let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let len = match dst {
            SocketAddr::V4(a) => {
                let sin = libc::sockaddr_in {
                    sin_family: libc::AF_INET as libc::sa_family_t,
                    sin_port: a.port().to_be(),
                    sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(a.ip().octets()) },
                    sin_zero: [0; 8],
                };
                // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
                unsafe { std::ptr::write((&raw mut storage).cast::<libc::sockaddr_in>(), sin) };
                size_of::<libc::sockaddr_in>()
            }
            SocketAddr::V6(a) => {
                let sin6 = libc::sockaddr_in6 {
                    sin6_family: libc::AF_INET6 as libc::sa_family_t,
                    sin6_port: a.port().to_be(),
                    sin6_flowinfo: a.flowinfo(),
                    sin6_addr: libc::in6_addr { s6_addr: a.ip().octets() },
                    sin6_scope_id: a.scope_id(),
                };
                // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in6.
                unsafe { std::ptr::write((&raw mut storage).cast::<libc::sockaddr_in6>(), sin6) };
                size_of::<libc::sockaddr_in6>()
            }
        };
        // SAFETY: `data` and `storage` are valid for the lengths passed; `fd` is open.
        let n = unsafe {
            libc::sendto(
                fd.as_raw_fd(),
                data.as_ptr().cast(),
                data.len(),
                libc::MSG_FASTOPEN | libc::MSG_NOSIGNAL,
                (&raw const storage).cast(),
                len as libc::socklen_t,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}
