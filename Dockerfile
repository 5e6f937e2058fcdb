# Multi-stage build: compile with the pinned toolchain, run on a distroless
# image with only glibc and CA certificates, as a non-root user.
#   docker build --build-arg PGCI_GIT_COMMIT=$(git rev-parse --short=12 HEAD) -t pg-cache-invalidator .
FROM rust:1.95-bookworm AS build
# .git is not in the build context: the commit for --version and
# pgci_build_info comes in as an argument.
ARG PGCI_GIT_COMMIT=unknown
ENV PGCI_GIT_COMMIT=${PGCI_GIT_COMMIT}
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin pg-cache-invalidator

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/pg-cache-invalidator /usr/local/bin/pg-cache-invalidator
USER 65532:65532
EXPOSE 9187
ENTRYPOINT ["/usr/local/bin/pg-cache-invalidator"]
CMD ["run", "--config", "/etc/pg-cache-invalidator/config.toml"]
