//! An expert node gives the memory of the experts it unloads back to the operating system:
//! load every expert of the f32 golden model, unload nine in ten (scattered, so the freed
//! buffers sit between live ones in the allocator's heaps), and the process's private memory
//! falls by most of what was unloaded. Alone in its test binary, so no other test allocates
//! meanwhile.

use std::path::PathBuf;

use moe_expert_node::ExpertNode;
use moe_meta::telemetry::process::private_bytes;
use moe_model::Config;

fn model() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/models/tiny-dsv3")
}

#[test]
fn unloaded_experts_return_their_memory() {
    let cfg = Config::from_dir(&model()).expect("config");
    let experts = cfg.moe().expect("moe").n_routed_experts;
    let all: Vec<(usize, usize)> = cfg
        .moe_layers()
        .into_iter()
        .flat_map(|l| (0..experts).map(move |e| (l, e)))
        .collect();
    let node = ExpertNode::load("n0".into(), &model(), &[], Default::default()).expect("opens");
    let empty = private_bytes().expect("RssAnon");
    node.load_pairs(&all).expect("loads");
    let full = private_bytes().expect("RssAnon");
    let loaded = node.expert_bytes() as u64;
    assert!(
        loaded > 16 << 20,
        "the test needs megabytes of experts: {loaded}"
    );
    assert!(
        full >= empty + loaded * 9 / 10,
        "loading {loaded} bytes grew private memory {empty} -> {full}"
    );
    let gone: Vec<(usize, usize)> = all.iter().copied().filter(|&(_, e)| e % 10 != 0).collect();
    node.unload_pairs(&gone);
    let kept = node.expert_bytes() as u64;
    let after = private_bytes().expect("RssAnon");
    let freed = loaded - kept;
    eprintln!(
        "private memory: {empty} empty, {full} with {loaded} B of experts, {after} with {kept} B"
    );
    assert!(
        full.saturating_sub(after) >= freed * 8 / 10,
        "unloading {freed} of {loaded} bytes gave back only {} bytes ({full} -> {after})",
        full.saturating_sub(after)
    );
    assert!(
        after <= empty + kept + kept / 5 + (2 << 20),
        "settled at {after} for {kept} bytes of experts (empty node: {empty})"
    );
}
