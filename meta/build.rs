//! Nothing to build: the build-dependency on protoc-bin-vendored is what matters (see Cargo.toml).
fn main() {}
