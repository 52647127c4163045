# syntax=docker/dockerfile:1
# One image for every role: `moe router|expert-node|coordinator` (see helm/moe-cluster).
#
#   docker build -t REGISTRY/moe-cluster:0.1.0 .
#
# CUDA variant, once the `cuda` cargo feature exists: a runtime base with the CUDA libraries,
# and a build base whose glibc is no newer than the runtime's (bookworm 2.36 <= Ubuntu 24.04 2.39).
#
#   docker build --build-arg FEATURES=cuda --build-arg RUST_IMAGE=rust:1.95-slim-bookworm \
#     --build-arg RUNTIME_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04 -t REGISTRY/moe-cluster:0.1.0-cuda .

ARG RUST_IMAGE=rust:1.95-slim-trixie
ARG RUNTIME_IMAGE=debian:trixie-slim

FROM ${RUST_IMAGE} AS build
# Cargo features of the `moe` binary (e.g. `cuda`); empty: the CPU build.
ARG FEATURES=""
WORKDIR /src
COPY . .
# Cargo.lock pins every dependency (--locked); etcd-client's protoc comes from the
# protoc-bin-vendored crate (.cargo/config.toml), so no system packages are needed.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p moe --features "${FEATURES}" \
    && install -D -m 0755 target/release/moe /out/moe

FROM ${RUNTIME_IMAGE}
# CA certificates for HTTPS (e.g. etcd or an OTLP collector behind TLS), from the build stage.
COPY --from=build /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
COPY --from=build /out/moe /usr/local/bin/moe
# A fixed non-root user (the chart's podSecurityContext runs as 10001 too). Nothing is written
# outside /tmp, so the root filesystem can be read-only.
RUN groupadd --system --gid 10001 moe \
    && useradd --system --uid 10001 --gid moe --home-dir /nonexistent --no-create-home \
       --shell /usr/sbin/nologin moe
USER 10001:10001
ENV MOE_LOG=info
EXPOSE 8000 7000 9090
ENTRYPOINT ["moe"]
CMD ["--help"]
