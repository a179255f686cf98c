//! Split-queue and descriptor-chain parsing with a guest-controlled ring.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vmm::devices::virtio::fuzzing::queue_and_chains(data);
});
