//! Compiles `proto/*.proto` with protox (no system protoc) and generates tonic/prost code in which
//! tensor payloads are `bytes::Bytes` (slices of the receive buffer, no copy).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["proto/expert.proto"];
    for p in &protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["proto"])?;
    tonic_prost_build::configure()
        .bytes(".moe.expert.v1.DispatchRequest.hidden")
        .bytes(".moe.expert.v1.DispatchRequest.weights")
        .bytes(".moe.expert.v1.DispatchResponse.output")
        .compile_fds(fds)?;
    Ok(())
}
