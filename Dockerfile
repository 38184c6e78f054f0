# syntax=docker/dockerfile:1.7
#
# The reflex server image.
#   docker build -t ghcr.io/reflex-rs/reflex:0.1.0 .
#   docker run --rm -p 50051:50051 -p 9090:9090 -v reflex-data:/var/lib/reflex ghcr.io/reflex-rs/reflex:0.1.0
#
# Needs BuildKit (the default builder of current Docker) for the cache mounts.

ARG RUST_VERSION=1

# ---------------------------------------------------------------------------- builder
FROM rust:${RUST_VERSION}-bookworm AS builder

# A C++ dependency is on the way; rust:*-bookworm normally carries g++ already, so this
# only installs it when it is missing. Not version-pinned: bookworm point releases
# replace the exact version, and the rust image itself is a moving tag.
# The Kafka client (cargo feature `kafka`, on by default) builds librdkafka with cmake,
# which the rust image does not carry. `$missing` is split into package names on purpose.
# hadolint ignore=DL3008,SC2086
RUN missing=""; \
    command -v g++ >/dev/null 2>&1 || missing="$missing g++"; \
    command -v cmake >/dev/null 2>&1 || missing="$missing cmake"; \
    if [ -n "$missing" ]; then \
        apt-get update \
        && apt-get install -y --no-install-recommends $missing \
        && rm -rf /var/lib/apt/lists/*; \
    fi

WORKDIR /src
# .dockerignore keeps target/, .git and data directories out of the context.
COPY . .

# The registry, git checkouts and target/ live in cache mounts, so rebuilds only
# recompile what changed. A cache mount is not part of the image, hence the copy out.
RUN --mount=type=cache,id=reflex-cargo-registry,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,id=reflex-cargo-git,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,id=reflex-target,target=/src/target,sharing=locked \
    cargo build --release --locked --bin reflex \
    && install -D -m 0755 target/release/reflex /out/reflex

# The data directory must exist and belong to the runtime user, so that a fresh named
# volume mounted there is writable (Docker copies the ownership into it).
RUN install -d -m 0750 -o 10001 -g 10001 /out/var-lib-reflex \
    && printf '%s\n' \
        '# Container defaults of the reflex image; mount your own file here, or point' \
        '# REFLEX_CONFIG elsewhere. REFLEX_<SECTION>__<KEY> variables override any key.' \
        'listen = "0.0.0.0:50051"' \
        '' \
        '[metrics]' \
        'listen = "0.0.0.0:9090"' \
        '' \
        '[store.embedded]' \
        'data_dir = "/var/lib/reflex"' \
        > /out/reflex.toml

# -------------------------------------------------------------------------- runtime
# distroless/cc: glibc, libgcc_s and libstdc++ (GCC 12, as in the bookworm builder), CA
# certificates and tzdata; no shell, no package manager.
FROM gcr.io/distroless/cc-debian12:nonroot

COPY --from=builder /out/reflex /usr/local/bin/reflex
COPY --from=builder --chown=10001:10001 /out/var-lib-reflex /var/lib/reflex

# Defaults for a container (written by the builder stage): listen on all interfaces,
# keep state in /var/lib/reflex. A file, not environment variables, because the server
# ranks REFLEX_* variables above the file: image-level variables would silently override
# the file that the Helm chart mounts over this one at the same path.
COPY --from=builder /out/reflex.toml /etc/reflex/reflex.toml
ENV REFLEX_CONFIG=/etc/reflex/reflex.toml

# The distroless `nonroot` user is 65532; the chart and our docs use 10001.
USER 10001:10001

# gRPC (with health and reflection), Prometheus /metrics.
EXPOSE 50051 9090

ENTRYPOINT ["/usr/local/bin/reflex"]
CMD ["serve"]
