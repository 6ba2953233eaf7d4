//! One message to the DNS proxy's answering code (`depfence::dns::Answerer`, what the proxy's
//! UDP and TCP listeners call) from a client of a given service, with an upstream that answers
//! from memory (input format: `depfence_fuzz::dns`). It must answer or refuse, or stay silent
//! only to what is not a query, without a panic and without waiting on anything. A reply is DNS,
//! a response, with the query's id and question, no larger than the client accepts, with TTLs
//! at most the cap. Enforce never sends a denied name upstream (unless probing), nor a
//! question nobody was attributed unless told to; only allowed answers enter the allow set.
//! The same question asked again (another id; answered from the answer cache when the first
//! answer may be kept) gets the same judgement and reply, with its own id, and a hit goes
//! nowhere upstream.
#![no_main]

use std::future::Future;
use std::pin::pin;
use std::sync::{Arc, LazyLock, Mutex};
use std::task::{Context, Poll, Waker};

use depfence::dns::{
    AllowChange, AllowSet, Answerer, CacheUse, DenyResponse, DnsEvent, DnsPolicy, Transport, TtlBounds, Unattributed,
};
use depfence::verdict::Verdict;
use depfence_fuzz::dns::{Asker, DnsCase, MemoryUpstream};
use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use libfuzzer_sys::fuzz_target;

static POLICY: LazyLock<DnsPolicy> = LazyLock::new(depfence_fuzz::dns::policy);

/// Runs what the answerer spawns (the background probe of denied names).
static RUNTIME: LazyLock<tokio::runtime::Runtime> =
    LazyLock::new(|| tokio::runtime::Builder::new_current_thread().enable_time().build().expect("a tokio runtime"));

fuzz_target!(|data: &[u8]| {
    let Some(case) = DnsCase::parse(data) else { return };
    let events = Arc::new(Mutex::new(Vec::new()));
    let store = Arc::clone(&events);
    let sink = {
        let events = Arc::clone(&events);
        move |e: DnsEvent| events.lock().unwrap().push(e)
    };
    let ttl = TtlBounds::default();
    let allow = Arc::new(AllowSet::new(ttl, 1024, |_: &AllowChange| {}));
    let settings = case.setup.settings;
    let answerer =
        Arc::new(Answerer::new(settings, MemoryUpstream::new(case.upstream), POLICY.clone(), Arc::clone(&allow), sink));
    let (client, local) = depfence_fuzz::dns::addresses();
    let transport = case.setup.transport;

    let reply = {
        let _runtime = RUNTIME.enter();
        let mut answering = pin!(answerer.answer(case.query, case.setup.asker.attribution(), client, local, transport));
        // The upstream answers at once: the answer must not wait on anything else.
        match answering.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(reply) => reply,
            Poll::Pending => panic!("answering waited, with an upstream that answers at once"),
        }
    };
    RUNTIME.block_on(tokio::task::yield_now());

    let query = Message::from_vec(case.query).ok();
    let sent_a_response = case.query.get(2).is_some_and(|flags| flags & 0x80 != 0);
    let single_question = query
        .as_ref()
        .filter(|q| q.metadata.message_type == MessageType::Query && q.metadata.op_code == OpCode::Query)
        .filter(|q| q.queries.len() == 1);
    match &reply {
        None => assert!(
            case.query.len() < 12 || sent_a_response,
            "silence for a query: {query:?} ({} bytes over {transport:?})",
            case.query.len()
        ),
        Some(bytes) => {
            assert!(!sent_a_response, "answered a response");
            let reply = Message::from_vec(bytes).unwrap_or_else(|e| panic!("the reply does not decode: {e}"));
            assert_eq!(reply.metadata.message_type, MessageType::Response);
            assert_eq!(reply.metadata.id.to_be_bytes(), case.query[..2], "the reply's id is not the query's");
            let limit = match transport {
                Transport::Udp => usize::from(query.as_ref().map_or(512, Message::max_payload)),
                Transport::Tcp => usize::from(u16::MAX),
            };
            assert!(
                bytes.len() <= limit,
                "a {}-byte reply over {transport:?}, the client accepts {limit}",
                bytes.len()
            );
            if let Some(query) = &query {
                assert_eq!(reply.metadata.op_code, query.metadata.op_code);
            }
            if let Some(query) = single_question {
                assert_eq!(reply.queries, query.queries, "the reply does not echo the question");
            }
            let cap = ttl.cap_secs();
            for record in reply.answers.iter().chain(&reply.authorities).chain(&reply.additionals) {
                assert!(record.ttl <= cap, "TTL {} above the cap {cap}: {record:?}", record.ttl);
            }
        }
    }

    let events = events.lock().unwrap().clone();
    assert!(!events.is_empty(), "a message nobody heard of");
    let asked = answerer.upstream().asked();
    for forwarded in &asked {
        let query = single_question.expect("forwarded something that is not one question");
        assert_eq!(forwarded.queries, query.queries, "forwarded another question");
    }
    let rejected = events.iter().any(|e| matches!(e, DnsEvent::Query(q) if q.verdict == Verdict::Rejected));
    if rejected {
        let rcode = reply.as_deref().map(|r| Message::from_vec(r).unwrap().metadata.response_code);
        let deny = match settings.deny {
            DenyResponse::Refused => ResponseCode::Refused,
            DenyResponse::NxDomain => ResponseCode::NXDomain,
        };
        assert_eq!(rcode, Some(deny), "a denied name answered otherwise");
        if !settings.probe_denied {
            assert!(asked.is_empty(), "a denied name went upstream");
        }
    }
    let unattributed = matches!(case.setup.asker, Asker::Nobody | Asker::UnknownService);
    if unattributed && settings.unattributed == Unattributed::Refuse {
        assert!(asked.is_empty(), "an unattributed question went upstream");
        if single_question.is_some() {
            let rcode = reply.as_deref().map(|r| Message::from_vec(r).unwrap().metadata.response_code);
            assert_eq!(rcode, Some(ResponseCode::Refused), "an unattributed question was not refused");
        }
    }
    let allowed = events.iter().any(|e| matches!(e, DnsEvent::Query(q) if q.verdict == Verdict::Allowed));
    if !allowed {
        assert!(allow.is_empty(), "addresses admitted for a name that was not allowed");
    }

    // Again, with another id: the same judgement and the same reply (but for the id and the
    // TTLs' age), from the cache when the first answer could be kept.
    let (Some(first), Some(_)) = (&reply, single_question) else { return };
    let mut again = case.query.to_vec();
    let Some(id) = again.get_mut(..2) else { return };
    id[0] ^= 0xff;
    let second = {
        let _runtime = RUNTIME.enter();
        let mut answering = pin!(answerer.answer(&again, case.setup.asker.attribution(), client, local, transport));
        match answering.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(reply) => reply,
            Poll::Pending => panic!("answering again waited"),
        }
    };
    RUNTIME.block_on(tokio::task::yield_now());
    let second = second.expect("silence for a question answered before");
    let (first, second) = (Message::from_vec(first).unwrap(), Message::from_vec(&second).unwrap());
    assert_eq!(second.metadata.id.to_be_bytes(), again[..2], "the second reply's id is not its query's");
    assert_eq!(second.metadata.response_code, first.metadata.response_code);
    assert_eq!(second.queries, first.queries);
    let strip = |m: &Message| m.answers.iter().map(|r| (r.name.clone(), r.data.clone())).collect::<Vec<_>>();
    assert_eq!(strip(&second), strip(&first), "a second answer differs from the first");
    let all = store.lock().unwrap().clone();
    let judged: Vec<_> = all
        .iter()
        .filter_map(|e| match e {
            DnsEvent::Query(q) => Some(q),
            _ => None,
        })
        .collect();
    if let [one, two] = judged.as_slice() {
        assert_eq!((one.verdict, &one.addrs), (two.verdict, &two.addrs), "judged otherwise the second time");
        if two.cache == CacheUse::Hit {
            assert_eq!(answerer.upstream().asked().len(), asked.len(), "a cache hit went upstream");
        }
    }
});
