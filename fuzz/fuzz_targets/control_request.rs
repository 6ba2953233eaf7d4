//! Any bytes the agent reads from its control socket as a request line must decode to a request
//! or give a one-line error the agent can send back, without a panic; a line longer than the
//! limit is refused unread. A request the agent accepts can be sent by the client (it fits the
//! limit) and survives an encode/decode round trip; so does a response the client accepts.
#![no_main]

use depfence::control_protocol::{MAX_REQUEST_LINE, ProtocolError, Request, Response};
use libfuzzer_sys::fuzz_target;

/// One line, ending in its only newline.
fn assert_one_line(line: &[u8]) {
    assert_eq!(line.last(), Some(&b'\n'), "no newline at the end");
    assert_eq!(line.iter().filter(|&&b| b == b'\n').count(), 1, "a line with several newlines");
}

fuzz_target!(|data: &[u8]| {
    match Request::from_line(data) {
        Ok(request) => {
            assert!(data.len() <= MAX_REQUEST_LINE);
            let line = request.to_line().unwrap_or_else(|e| panic!("an accepted request cannot be sent: {e}"));
            assert_one_line(&line);
            assert!(line.len() <= MAX_REQUEST_LINE, "an accepted request is too long to send");
            let again = Request::from_line(&line).unwrap_or_else(|e| panic!("a sent request is refused: {e}"));
            assert_eq!(again, request);
        }
        Err(e) => {
            if data.len() > MAX_REQUEST_LINE {
                assert!(matches!(e, ProtocolError::TooLong), "a long line was read: {e}");
            }
            // What the agent answers: one line the client decodes to this refusal.
            let message = e.to_string();
            assert!(!message.is_empty());
            let answer = Response::error(message.clone()).to_line().unwrap();
            assert_one_line(&answer);
            let answer = Response::from_line(&answer).unwrap();
            assert!(!answer.ok);
            assert_eq!(answer.error.as_deref(), Some(message.as_str()));
        }
    }
    if let Ok(response) = Response::from_line(data) {
        let line = response.to_line().unwrap_or_else(|e| panic!("a decoded response cannot be encoded: {e}"));
        assert_one_line(&line);
        let again = Response::from_line(&line).unwrap_or_else(|e| panic!("an encoded response is refused: {e}"));
        assert_eq!(again, response);
    }
});
