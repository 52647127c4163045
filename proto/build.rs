//! Compiles `proto/*.proto` with protox (no system protoc) and generates tonic/prost code in which
//! tensor payloads are `bytes::Bytes` (slices of the receive buffer, no copy),
//! with `crate::codec::StrictCodec` so a malformed message is `InvalidArgument`, not `INTERNAL`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["proto/expert.proto"];
    for p in &protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["proto"])?;
    tonic_prost_build::configure()
        .codec_path("crate::codec::StrictCodec")
        .bytes(".moe.expert.v1.DispatchRequest.hidden")
        .bytes(".moe.expert.v1.DispatchRequest.weights")
        .bytes(".moe.expert.v1.DispatchResponse.output")
        .compile_fds(fds)?;
    Ok(())
}
