//! What the fuzz targets share with the seed-corpus generator (`examples/seed_corpus.rs`): the
//! input format of `dns_query` and the fixtures it runs against. The other targets take their
//! input as it comes: a policy's text (`parse_compile`), a control-socket line
//! (`control_request`), a snapshot file (`snapshot_decode`).

pub mod dns {
    //! The `dns_query` target: one message to the proxy's [`Answerer`](depfence::dns::Answerer)
    //! from a client of a given service, over UDP or TCP, with an upstream that answers from
    //! memory.
    //!
    //! An input is a [`DnsCase`]: a [`Setup`] byte, the length of the client's message (`u16`,
    //! big endian), the message, then what the upstream answers (the rest; empty or not DNS: the
    //! upstream fails).

    use std::future::Future;
    use std::net::SocketAddr;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use depfence::dns::{
        AnswerSettings, Attribution, DenyResponse, DnsPolicy, Transport, Unattributed, Upstream, UpstreamError,
    };
    use hickory_proto::op::Message;

    /// The policy the target judges by: one service per mode, each allowed the same names.
    pub const POLICY: &str = r#"
version = 1
[environments]
prod = { mode = "enforce" }

[services.web]
mode = "enforce"
allow = [{ host = "*.mirror.internal" }, { host = "pypi.org", ports = [443], proto = "tcp" }]

[services.batch]
mode = "audit"
allow = [{ host = "*.mirror.internal" }, { host = "pypi.org", ports = [443], proto = "tcp" }]

[services.idle]
mode = "off"
allow = [{ host = "*.mirror.internal" }]
"#;

    /// [`POLICY`] as the proxy reads it.
    pub fn policy() -> DnsPolicy {
        match depfence::compile::compile_str("fuzz-dns.toml", POLICY) {
            Ok(compiled) => DnsPolicy::from_snapshot(&compiled.snapshot, 0),
            Err((sources, diagnostics)) => {
                let text: Vec<String> = diagnostics.iter().map(|d| d.to_plain(&sources)).collect();
                panic!("the fuzz policy does not compile: {text:?}")
            }
        }
    }

    /// Where the client sends from.
    pub const CLIENT: &str = "127.0.0.1:40000";
    /// The proxy address it sent to (a redirect slot).
    pub const LOCAL: &str = "127.53.0.7:53";

    /// Who asks.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Asker {
        /// A process of `web` (enforce).
        Enforce,
        /// A process of `batch` (audit).
        Audit,
        /// A process of `idle` (off).
        Off,
        /// A process of a service the policy does not know.
        UnknownService,
        /// Nobody the attributor knows.
        Nobody,
    }

    impl Asker {
        /// The service the attributor names.
        pub fn service(self) -> Option<&'static str> {
            match self {
                Asker::Enforce => Some("web"),
                Asker::Audit => Some("batch"),
                Asker::Off => Some("idle"),
                Asker::UnknownService => Some("ghost"),
                Asker::Nobody => None,
            }
        }

        /// What the attributor says.
        pub fn attribution(self) -> Option<Attribution> {
            let service = self.service()?;
            Some(Attribution {
                service: Arc::from(service),
                cgroup_id: 4242,
                pid: 1234,
                comm: "fuzz".to_owned(),
                original_server: "10.0.0.53:53".parse().ok()?,
            })
        }
    }

    /// The first byte of an input: bits 0–2 who asks (0 `web`, 1 `batch`, 2 `idle`, 3 an unknown
    /// service, 4–7 nobody), bit 3 TCP, bit 4 deny with `NXDOMAIN`, bit 5 forward unattributed
    /// queries, bit 6 probe denied names.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct Setup {
        /// Who asks.
        pub asker: Asker,
        /// How the message came.
        pub transport: Transport,
        /// The answerer's settings.
        pub settings: AnswerSettings,
    }

    impl Setup {
        /// Decodes the setup byte.
        pub fn from_byte(byte: u8) -> Setup {
            let asker = match byte & 0b111 {
                0 => Asker::Enforce,
                1 => Asker::Audit,
                2 => Asker::Off,
                3 => Asker::UnknownService,
                _ => Asker::Nobody,
            };
            let transport = if byte & 0x08 != 0 { Transport::Tcp } else { Transport::Udp };
            let settings = AnswerSettings {
                deny: if byte & 0x10 != 0 { DenyResponse::NxDomain } else { DenyResponse::Refused },
                unattributed: if byte & 0x20 != 0 { Unattributed::Forward } else { Unattributed::Refuse },
                probe_denied: byte & 0x40 != 0,
            };
            Setup { asker, transport, settings }
        }

        /// Encodes the setup byte.
        pub fn to_byte(self) -> u8 {
            let asker = match self.asker {
                Asker::Enforce => 0,
                Asker::Audit => 1,
                Asker::Off => 2,
                Asker::UnknownService => 3,
                Asker::Nobody => 4,
            };
            let mut byte = asker;
            if self.transport == Transport::Tcp {
                byte |= 0x08;
            }
            if self.settings.deny == DenyResponse::NxDomain {
                byte |= 0x10;
            }
            if self.settings.unattributed == Unattributed::Forward {
                byte |= 0x20;
            }
            if self.settings.probe_denied {
                byte |= 0x40;
            }
            byte
        }
    }

    /// One input of the `dns_query` target.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct DnsCase<'a> {
        /// Who asks, how, and the answerer's settings.
        pub setup: Setup,
        /// The client's message.
        pub query: &'a [u8],
        /// The upstream's answer (its id and question are set to the forwarded query's).
        pub upstream: &'a [u8],
    }

    impl<'a> DnsCase<'a> {
        /// Splits an input; None when it is shorter than its setup byte and length. A length
        /// past the end takes what there is.
        pub fn parse(data: &'a [u8]) -> Option<DnsCase<'a>> {
            let (&[setup, len0, len1], rest) = data.split_first_chunk::<3>()?;
            let len = usize::from(u16::from_be_bytes([len0, len1])).min(rest.len());
            let (query, upstream) = rest.split_at(len);
            Some(DnsCase { setup: Setup::from_byte(setup), query, upstream })
        }

        /// The input that [`DnsCase::parse`] splits into this case.
        pub fn to_bytes(&self) -> Vec<u8> {
            let len = u16::try_from(self.query.len()).unwrap_or(u16::MAX);
            let mut out = vec![self.setup.to_byte()];
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(self.query.get(..usize::from(len)).unwrap_or(self.query));
            out.extend_from_slice(self.upstream);
            out
        }
    }

    /// An upstream that answers from memory, at once, with what a server's answer can be (or
    /// the proxy would not take it): the bytes it was given, read as a response to a QUERY (the
    /// flags' QR bit set and opcode cleared before decoding: what a message may hold depends on
    /// its opcode), then given the forwarded query's id and question. No answer when the bytes
    /// do not decode. Keeps what it was asked.
    #[derive(Debug)]
    pub struct MemoryUpstream {
        answer: Option<Message>,
        asked: Mutex<Vec<Message>>,
    }

    impl MemoryUpstream {
        /// Answers with `answer`, decoded as a response to a QUERY.
        pub fn new(answer: &[u8]) -> MemoryUpstream {
            let mut bytes = answer.to_vec();
            if let Some(flags) = bytes.get_mut(2) {
                *flags = (*flags & 0b1000_0111) | 0b1000_0000;
            }
            MemoryUpstream { answer: Message::from_vec(&bytes).ok(), asked: Mutex::new(Vec::new()) }
        }

        /// The queries it was sent.
        pub fn asked(&self) -> Vec<Message> {
            self.asked.lock().map(|a| a.clone()).unwrap_or_default()
        }
    }

    impl Upstream for MemoryUpstream {
        fn forward(&self, query: &Message) -> impl Future<Output = Result<Message, UpstreamError>> + Send {
            if let Ok(mut asked) = self.asked.lock() {
                asked.push(query.clone());
            }
            let answer = match &self.answer {
                // The proxy forwards only QUERYs: the opcode is already the query's.
                Some(answer) if answer.metadata.op_code == query.metadata.op_code => {
                    let mut answer = answer.clone();
                    answer.metadata.id = query.metadata.id;
                    answer.queries = query.queries.clone();
                    Ok(answer)
                }
                _ => Err(UpstreamError::Timeout(Duration::from_millis(1500))),
            };
            std::future::ready(answer)
        }
    }

    /// The client's and the proxy's addresses.
    pub fn addresses() -> (SocketAddr, SocketAddr) {
        let parse = |s: &str| s.parse().unwrap_or(SocketAddr::from(([127, 0, 0, 1], 53)));
        (parse(CLIENT), parse(LOCAL))
    }
}
