# syntax=docker/dockerfile:1
# Build: protoc is vendored by the build script, so the builder needs nothing beyond Rust.
FROM rust:1.95-bookworm AS builder
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto ./proto
COPY migrations ./migrations
COPY src ./src
# The password blocklist (embedded) and the vendored fred (see vendor/README.md).
COPY data ./data
COPY vendor ./vendor
# Cargo reads every target of the manifest, the benchmark included, and every workspace member
# (the protocol model).
COPY benches ./benches
COPY model ./model
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin authd \
    && cp target/release/authd /usr/local/bin/authd

# Run: a small image with the one binary (migrations are embedded in it).
FROM debian:bookworm-slim
RUN useradd --system --uid 10001 --no-create-home authd
COPY --from=builder /usr/local/bin/authd /usr/local/bin/authd
USER authd
ENV GRPC__ADDR=0.0.0.0:50051 \
    LOG__FORMAT=json
EXPOSE 50051 9090
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s --retries=3 \
    CMD ["authd", "healthcheck"]
ENTRYPOINT ["authd"]
CMD ["serve"]
