//! virtio-blk request parsing and execution against an in-memory disk.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vmm::devices::virtio::fuzzing::blk_requests(data);
});
