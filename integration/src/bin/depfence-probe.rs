//! Test helper, spawned inside the cgroup under test. Makes real socket calls and prints
//! one line: `ok <n>` or `err <errno> <n_ok_before>`.
//!
//! usage: depfence-probe <tcp|udp|udpconnect|tally> <ip> <port> [count]
//!   tcp         TcpStream::connect (connect4/connect6 hook)
//!   udp         unconnected UdpSocket::send_to (sendmsg4/sendmsg6 hook)
//!   udpconnect  one UDP socket, connect() `count` times (connect4/6 hook, no packets: bench)
//!   tally       `count` TCP connects that go on after failures; prints
//!               `tally <ok> <eperm> <other errors>` instead
use std::{
    net::{IpAddr, SocketAddr, TcpStream, UdpSocket},
    process::ExitCode,
};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let (Some(kind), Some(ip), Some(port)) = (args.get(1), args.get(2), args.get(3)) else {
        eprintln!("usage: depfence-probe <tcp|udp|udpconnect|tally> <ip> <port> [count]");
        return ExitCode::from(2);
    };
    let (Ok(ip), Ok(port)) = (ip.parse::<IpAddr>(), port.parse::<u16>()) else {
        eprintln!("bad address");
        return ExitCode::from(2);
    };
    let count: u64 = args.get(4).and_then(|c| c.parse().ok()).unwrap_or(1);
    let dst = SocketAddr::new(ip, port);
    let bind: SocketAddr = if ip.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse().unwrap_or(dst);
    if kind == "tally" {
        let (mut ok, mut eperm, mut other) = (0u64, 0u64, 0u64);
        for _ in 0..count {
            match TcpStream::connect(dst) {
                Ok(s) => {
                    drop(s);
                    ok += 1;
                }
                Err(e) if e.raw_os_error() == Some(1) => eperm += 1,
                Err(_) => other += 1,
            }
        }
        println!("tally {ok} {eperm} {other}");
        return ExitCode::SUCCESS;
    }
    let mut ok = 0u64;
    let result = (|| -> std::io::Result<()> {
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
            _ => return Err(std::io::Error::other("unknown kind")),
        }
        Ok(())
    })();
    match result {
        Ok(()) => {
            println!("ok {ok}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("err {} {ok}", e.raw_os_error().unwrap_or(-1));
            ExitCode::from(1)
        }
    }
}
