//! Any text given to the policy front end and compiler must produce a snapshot or diagnostics,
//! never a panic; a snapshot must survive an encode/decode round trip unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    match depfence::compile::compile_str("fuzz.toml", text) {
        Ok(compiled) => {
            let bytes = compiled.snapshot.to_bytes().expect("encode");
            let decoded = depfence::snapshot::Snapshot::from_bytes(&bytes).expect("decode");
            assert_eq!(decoded, compiled.snapshot);
        }
        Err((sources, diagnostics)) => {
            assert!(!diagnostics.is_empty());
            for d in diagnostics.iter() {
                let _ = d.to_plain(&sources);
                let _ = d.to_json(&sources);
            }
        }
    }
});
