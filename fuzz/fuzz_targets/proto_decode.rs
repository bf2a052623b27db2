//! Protocol decoding: arbitrary bytes as either direction's stream message
//! (what a hostile agent or a broken network could send). Decoding must
//! never panic; whatever decodes must encode again and decode to the same
//! message.

#![no_main]

use corral_proto::pb;
use libfuzzer_sys::fuzz_target;
use prost::Message;

fn round_trip<M: Message + Default + PartialEq + std::fmt::Debug>(data: &[u8]) {
    if let Ok(msg) = M::decode(data) {
        let bytes = msg.encode_to_vec();
        let again = M::decode(bytes.as_slice()).expect("a re-encoded message decodes");
        assert_eq!(msg, again, "encode/decode is stable");
        // Debug (hand-written for CreateSandbox) must not panic either.
        let _ = format!("{msg:?}");
    }
}

fuzz_target!(|data: &[u8]| {
    round_trip::<pb::AgentMessage>(data);
    round_trip::<pb::ControlMessage>(data);
});
