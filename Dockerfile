# syntax=docker/dockerfile:1
# Base images are pinned by digest, so a rebuild takes exactly the bytes that were reviewed. To
# move to a newer patch release, look the digest up and replace it (and the tag beside it):
#   docker buildx imagetools inspect rust:1.95-bookworm      (the "Digest:" line)
#   docker buildx imagetools inspect debian:bookworm-slim
# (or let Dependabot/Renovate's docker ecosystem open the change).
# Build: protoc is vendored by the build script, so the builder needs nothing beyond Rust.
FROM rust:1.95-bookworm@sha256:6258907abe69656e41cd992e0b705cdcfabcbbe3db374f92ed2d47121282d4a1 AS builder
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto ./proto
# Envoy's protos, which the build script compiles for external authorization.
COPY proto-vendor ./proto-vendor
COPY migrations ./migrations
COPY src ./src
# The password blocklist (embedded) and the vendored fred (see vendor/README.md).
COPY data ./data
COPY vendor ./vendor
# Cargo reads every target of the manifest, the benchmark included, and every workspace member
# (the protocol model, the Rust client).
COPY benches ./benches
COPY model ./model
COPY client ./client
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin authd \
    && cp target/release/authd /usr/local/bin/authd

# Run: a small image with the one binary (migrations are embedded in it) and the CA roots that
# verify a managed PostgreSQL or Redis with a public certificate (rediss://, sslmode=verify-full
# without sslrootcert).
FROM debian:bookworm-slim@sha256:3783cc01769c7b2b1b83a5c5ad96c815348e28ed7da68e2e3687004faa906251
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --no-create-home authd
COPY --from=builder /usr/local/bin/authd /usr/local/bin/authd
USER authd
ENV GRPC__ADDR=0.0.0.0:50051 \
    LOG__FORMAT=json
LABEL org.opencontainers.image.title="authd" \
      org.opencontainers.image.description="Sessions and user profiles for a fleet of services, over gRPC" \
      org.opencontainers.image.licenses="MIT OR Apache-2.0" \
      org.opencontainers.image.version="0.1.0"
EXPOSE 50051 9090
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s --retries=3 \
    CMD ["authd", "healthcheck"]
ENTRYPOINT ["authd"]
CMD ["serve"]
