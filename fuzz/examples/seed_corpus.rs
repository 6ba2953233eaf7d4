//! Writes the committed seed corpus of the fuzz targets, `fuzz/corpus/<target>/`, with the real
//! encoders: DNS messages built with hickory (several record types, EDNS, malformed ones) with
//! upstream answers, in `dns_query`'s input format; control lines from `Request::to_line` and
//! `Response::to_line`; snapshots compiled from `policy-examples/`. (`parse_compile` is seeded
//! with the policy examples themselves, by `scripts/test`.) Run it from anywhere:
//!
//! ```sh
//! cargo run --manifest-path fuzz/Cargo.toml --example seed_corpus
//! ```
//!
//! Each of those folders is the generator's: it is emptied, then written again, except for the
//! inputs a fuzz run found (`regression-*`), which are kept (and must be rewritten by hand
//! when an encoding changes).

use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

use depfence::control_protocol::{Request, Response};
use depfence::dns::{AnswerSettings, DenyResponse, Transport, Unattributed};
use depfence::verdict::Mode;
use depfence_fuzz::dns::{Asker, DnsCase, Setup};
use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::opt::EdnsOption;
use hickory_proto::rr::rdata::{A, AAAA, CNAME, MX, SOA, SRV, TXT};
use hickory_proto::rr::{Name, RData, Record, RecordType};

fn name(text: &str) -> Name {
    Name::from_ascii(text).unwrap_or_else(|e| panic!("name `{text}`: {e}"))
}

fn query(id: u16, qname: &str, qtype: RecordType) -> Message {
    let mut m = Message::query();
    m.metadata.id = id;
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(name(qname), qtype));
    m
}

fn with_edns(mut m: Message, payload: u16, dnssec_ok: bool, options: Vec<EdnsOption>) -> Message {
    let mut edns = Edns::new();
    edns.set_max_payload(payload);
    edns.set_dnssec_ok(dnssec_ok);
    for option in options {
        edns.options_mut().insert(option);
    }
    m.set_edns(edns);
    m
}

fn encode(m: &Message) -> Vec<u8> {
    m.to_vec().unwrap_or_else(|e| panic!("encode {m:?}: {e}"))
}

/// An upstream answer to `q` (the fuzz target sets its id and question again).
fn answer(q: &Message, records: Vec<Record>) -> Message {
    let mut m = Message::response(q.metadata.id, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.metadata.recursion_available = true;
    m.add_queries(q.queries.iter().cloned());
    for record in records {
        m.add_answer(record);
    }
    m
}

fn record(owner: &str, ttl: u32, data: RData) -> Record {
    Record::from_rdata(name(owner), ttl, data)
}

fn setup(asker: Asker, transport: Transport) -> Setup {
    Setup { asker, transport, settings: AnswerSettings::default() }
}

fn dns_seeds() -> Vec<(String, Vec<u8>)> {
    let mut seeds = Vec::new();
    let mut add = |label: &str, setup: Setup, query: &[u8], upstream: &[u8]| {
        seeds.push((label.to_owned(), DnsCase { setup, query, upstream }.to_bytes()));
    };
    let (udp, tcp) = (Transport::Udp, Transport::Tcp);

    // Allowed names, several types, with the upstream's answers.
    let q = query(0x1001, "a.mirror.internal.", RecordType::A);
    let a = answer(&q, vec![record("a.mirror.internal.", 3600, RData::A(A(Ipv4Addr::new(10, 0, 0, 10))))]);
    add("a-allowed-udp", setup(Asker::Enforce, udp), &encode(&q), &encode(&a));
    add("a-allowed-tcp", setup(Asker::Enforce, tcp), &encode(&q), &encode(&a));
    add("a-audit", setup(Asker::Audit, udp), &encode(&q), &encode(&a));
    add("a-off", setup(Asker::Off, udp), &encode(&q), &encode(&a));
    add("a-upstream-fails", setup(Asker::Enforce, udp), &encode(&q), &[]);

    let q = query(0x1002, "A.B.Mirror.Internal.", RecordType::AAAA);
    let a = answer(
        &q,
        vec![record("a.b.mirror.internal.", 60, RData::AAAA(AAAA(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x10))))],
    );
    add("aaaa-allowed-mixed-case", setup(Asker::Enforce, udp), &encode(&q), &encode(&a));

    let q = query(0x1003, "cdn.mirror.internal.", RecordType::A);
    let a = answer(
        &q,
        vec![
            record("cdn.mirror.internal.", 300, RData::CNAME(CNAME(name("edge.cdn.example.")))),
            record("edge.cdn.example.", 300, RData::CNAME(CNAME(name("e1.cdn.example.")))),
            record("e1.cdn.example.", 20, RData::A(A(Ipv4Addr::new(10, 1, 0, 1)))),
            record("other.example.", 20, RData::A(A(Ipv4Addr::new(10, 9, 9, 9)))),
        ],
    );
    add("cname-chain", setup(Asker::Enforce, udp), &encode(&q), &encode(&a));

    let q = query(0x1004, "mirror.internal.", RecordType::MX);
    let a = answer(&q, vec![record("mirror.internal.", 300, RData::MX(MX::new(10, name("mx.mirror.internal."))))]);
    add("mx-denied-bare-domain", setup(Asker::Enforce, udp), &encode(&q), &encode(&a));
    add(
        "mx-denied-probed",
        Setup {
            settings: AnswerSettings { probe_denied: true, ..AnswerSettings::default() },
            ..setup(Asker::Enforce, udp)
        },
        &encode(&q),
        &encode(&a),
    );

    let q = query(0x1005, "pkg.mirror.internal.", RecordType::TXT);
    let a = answer(
        &q,
        vec![record("pkg.mirror.internal.", 300, RData::TXT(TXT::new(vec!["v=1".to_owned(), "x".repeat(200)])))],
    );
    add("txt-allowed", setup(Asker::Enforce, tcp), &encode(&q), &encode(&a));

    let q = query(0x1006, "_https._tcp.pypi.org.", RecordType::SRV);
    let a = answer(&q, vec![record("_https._tcp.pypi.org.", 300, RData::SRV(SRV::new(0, 5, 443, name("pypi.org."))))]);
    add(
        "srv-denied-nxdomain",
        Setup {
            settings: AnswerSettings { deny: DenyResponse::NxDomain, ..AnswerSettings::default() },
            ..setup(Asker::Enforce, udp)
        },
        &encode(&q),
        &encode(&a),
    );

    let q = query(0x1007, "pypi.org.", RecordType::HTTPS);
    add("https-type-upstream-empty", setup(Asker::Enforce, udp), &encode(&q), &encode(&answer(&q, vec![])));

    let q = query(0x1008, "evilmirror.internal.", RecordType::ANY);
    add("any-denied-lookalike", setup(Asker::Enforce, udp), &encode(&q), &[]);

    // Not found: NXDOMAIN with an SOA in the authority section.
    let q = query(0x1009, "gone.mirror.internal.", RecordType::A);
    let mut a = answer(&q, vec![]);
    a.metadata.response_code = ResponseCode::NXDomain;
    a.add_authority(record(
        "mirror.internal.",
        900,
        RData::SOA(SOA::new(name("ns.mirror.internal."), name("hostmaster.mirror.internal."), 1, 3600, 600, 86400, 60)),
    ));
    add("nxdomain-upstream", setup(Asker::Enforce, udp), &encode(&q), &encode(&a));

    // EDNS: a small and a large payload, the DO bit, options; a big answer (truncated over UDP).
    let q = with_edns(query(0x100a, "big.mirror.internal.", RecordType::A), 1232, true, vec![]);
    let records =
        (0..100u8).map(|i| record("big.mirror.internal.", 60, RData::A(A(Ipv4Addr::new(10, 2, 0, i))))).collect();
    let a = with_edns(answer(&q, records), 4096, true, vec![]);
    add("edns-1232-big-answer-udp", setup(Asker::Enforce, udp), &encode(&q), &encode(&a));
    add("edns-1232-big-answer-tcp", setup(Asker::Enforce, tcp), &encode(&q), &encode(&a));
    let q = query(0x100b, "big.mirror.internal.", RecordType::A);
    add("no-edns-big-answer-udp", setup(Asker::Enforce, udp), &encode(&q), &encode(&a));
    let cookie = EdnsOption::Unknown(10, vec![0x5a; 8]);
    let q = with_edns(query(0x100c, "a.mirror.internal.", RecordType::A), 4096, false, vec![cookie]);
    let nsid = EdnsOption::Unknown(3, b"upstream-1".to_vec());
    let a = with_edns(
        answer(&q, vec![record("a.mirror.internal.", 30, RData::A(A(Ipv4Addr::new(10, 0, 0, 10))))]),
        1232,
        false,
        vec![nsid],
    );
    add("edns-cookie-answer-with-nsid", setup(Asker::Enforce, udp), &encode(&q), &encode(&a));

    // The upstream says it truncated; the upstream fails with SERVFAIL.
    let q = query(0x100d, "a.mirror.internal.", RecordType::A);
    let mut a = answer(&q, vec![]);
    a.metadata.truncation = true;
    add("upstream-truncated", setup(Asker::Enforce, udp), &encode(&q), &encode(&a));
    let mut a = answer(&q, vec![]);
    a.metadata.response_code = ResponseCode::ServFail;
    add("upstream-servfail", setup(Asker::Audit, tcp), &encode(&q), &encode(&a));

    // Nobody, or a service the policy does not know: refused, or forwarded when told to.
    let q = query(0x100e, "a.mirror.internal.", RecordType::A);
    let a = answer(&q, vec![record("a.mirror.internal.", 300, RData::A(A(Ipv4Addr::new(10, 0, 0, 10))))]);
    add("unattributed-refused", setup(Asker::Nobody, udp), &encode(&q), &encode(&a));
    add("unknown-service-refused", setup(Asker::UnknownService, tcp), &encode(&q), &encode(&a));
    let forward = AnswerSettings { unattributed: Unattributed::Forward, ..AnswerSettings::default() };
    add("unattributed-forwarded", Setup { settings: forward, ..setup(Asker::Nobody, udp) }, &encode(&q), &encode(&a));

    // Malformed: a response, two questions, no question, another opcode, a short header,
    // a header whose counts promise more than there is.
    let mut m = query(0x2001, "a.mirror.internal.", RecordType::A);
    m.metadata.message_type = MessageType::Response;
    add("malformed-a-response", setup(Asker::Enforce, udp), &encode(&m), &[]);
    let mut m = query(0x2002, "a.mirror.internal.", RecordType::A);
    m.add_query(Query::query(name("b.mirror.internal."), RecordType::AAAA));
    add("malformed-two-questions", setup(Asker::Enforce, udp), &encode(&m), &[]);
    let mut m = Message::query();
    m.metadata.id = 0x2003;
    add("malformed-no-question", setup(Asker::Enforce, tcp), &encode(&m), &[]);
    let mut m = query(0x2004, "mirror.internal.", RecordType::SOA);
    m.metadata.op_code = OpCode::Notify;
    add("malformed-notify", setup(Asker::Enforce, udp), &encode(&m), &[]);
    let q = encode(&query(0x2005, "a.mirror.internal.", RecordType::A));
    add("malformed-short-header", setup(Asker::Enforce, udp), &q[..11], &[]);
    let mut counts = q.clone();
    counts[7] = 0x05; // five answers, none there
    add("malformed-counts", setup(Asker::Enforce, udp), &counts, &[]);
    add("malformed-truncated-question", setup(Asker::Enforce, tcp), &q[..q.len() - 3], &[]);
    seeds
}

fn control_seeds() -> Vec<(String, Vec<u8>)> {
    let requests = [
        ("status", Request::Status),
        ("events", Request::Events { follow: false, recent: 20 }),
        ("events-follow", Request::Events { follow: true, recent: 0 }),
        ("explain", Request::Explain { from: "storefront".into(), to: "10.0.2.5:8000/tcp".into() }),
        ("reload", Request::Reload),
        (
            "promote",
            Request::Promote {
                service: "orders-db".into(),
                environment: Some("prod".into()),
                mode: Mode::Enforce,
                force: false,
                reason: None,
                dry_run: true,
            },
        ),
        (
            "demote-forced",
            Request::Promote {
                service: "orders-api".into(),
                environment: None,
                mode: Mode::Audit,
                force: true,
                reason: Some("rollback after incident 42".into()),
                dry_run: false,
            },
        ),
        ("apply-candidate", Request::ApplyCandidate { path: PathBuf::from("/etc/depfence/candidate.toml") }),
        ("activate-candidate", Request::ActivateCandidate),
        ("drop-candidate", Request::DropCandidate),
    ];
    let mut seeds: Vec<(String, Vec<u8>)> = requests
        .into_iter()
        .map(|(label, request)| {
            (format!("request-{label}"), request.to_line().unwrap_or_else(|e| panic!("{label}: {e}")))
        })
        .collect();
    let responses = [
        (
            "ok",
            Response::ok(
                serde_json::json!({ "ready": true, "generation": 3, "services": ["web", "db"], "ratio": 0.25 }),
            ),
        ),
        ("error", Response::error("no policy in force yet")),
    ];
    for (label, response) in responses {
        seeds.push((format!("response-{label}"), response.to_line().unwrap_or_else(|e| panic!("{label}: {e}"))));
    }
    seeds
}

fn snapshot_seeds(examples: &Path) -> Vec<(String, Vec<u8>)> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(examples)
        .unwrap_or_else(|e| panic!("{}: {e}", examples.display()))
        .map(|entry| entry.map(|e| e.path()))
        .collect::<Result<_, _>>()
        .unwrap_or_else(|e| panic!("{}: {e}", examples.display()));
    entries.sort();
    let mut seeds = Vec::new();
    for path in entries {
        // The broken examples do not compile: nothing to encode.
        let Ok(compiled) = depfence::compile::compile_path(&path) else { continue };
        let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("policy").to_owned();
        let bytes = compiled.snapshot.to_bytes().unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        seeds.push((stem, bytes));
    }
    assert!(!seeds.is_empty(), "no example compiled");
    seeds
}

fn write(corpus: &Path, target: &str, seeds: Vec<(String, Vec<u8>)>) {
    let dir = corpus.join(target);
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let old = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    for entry in old {
        let path = entry.unwrap_or_else(|e| panic!("{}: {e}", dir.display())).path();
        let found_by_fuzzing = path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("regression-"));
        if !found_by_fuzzing {
            std::fs::remove_file(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        }
    }
    let (count, mut bytes) = (seeds.len(), 0);
    for (label, data) in seeds {
        bytes += data.len();
        let path = dir.join(&label);
        assert!(!path.exists(), "two seeds named {label}");
        std::fs::write(&path, data).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    }
    println!("{target}: {count} seeds, {bytes} bytes");
}

fn main() {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR"));
    let corpus = fuzz.join("corpus");
    write(&corpus, "dns_query", dns_seeds());
    write(&corpus, "control_request", control_seeds());
    write(&corpus, "snapshot_decode", snapshot_seeds(&fuzz.join("../policy-examples")));
}
