# GPU image of raypref for Ray clusters: the cluster launcher (clusters/ray-cluster.yaml) and
# KubeRay (clusters/rayjob.yaml) both run it on the head, the workers and the job submitter.
#
#   docker build -t ghcr.io/raypref/raypref:0.1.0 .
#
# The image name is defined once, in the label below; tests/test_clusters.py checks that the
# cluster files use exactly that name and that its tag is the project version.
#
# The base carries Ray with CUDA; its Ray version must equal the one every node and client runs
# (Ray refuses mixed versions), which is why the base tag, not pip, fixes it. The tag should also
# carry the digest of the image it names (`<tag>@sha256:...`), so that a moved tag cannot change
# the build: `bash scripts/pin_base_image.sh` writes it, where Docker Hub is reachable (the
# project's own machines reach only package registries, so it is not pinned yet).
FROM rayproject/ray:2.60.0-py311-gpu

LABEL org.opencontainers.image.title="raypref" \
      org.opencontainers.image.description="Ray-distributed experiment platform for personalized LLM alignment" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.ref.name="ghcr.io/raypref/raypref:0.1.0"

# The base image's non-root user `ray` (uid 1000, group users = 100), numeric so that the host
# can resolve it; everything below runs as, and is owned by, this user.
USER 1000:100

ENV PYTHONUNBUFFERED=1

# Created by the user itself so that pip's in-tree build can write here.
RUN mkdir -p /home/ray/raypref
WORKDIR /home/ray/raypref

# torch first, from the normal index: there 2.13.0 is the CUDA build (with its CUDA libraries),
# which requirements.lock leaves out; then every other dependency at the version and hash that
# the lock records (scripts/lock.sh), as scripts/setup.sh installs them.
COPY --chown=1000:100 requirements.lock requirements-nodeps.lock ./
RUN pip install --no-cache-dir torch==2.13.0 \
    && pip install --no-cache-dir --require-hashes -r requirements.lock \
    && pip install --no-cache-dir --require-hashes --no-deps -r requirements-nodeps.lock

# Package metadata and code before the job scripts, so editing a job or a config reuses the
# dependency layer. The dependencies are all in place: the project adds only itself.
COPY --chown=1000:100 pyproject.toml README.md ./
COPY --chown=1000:100 raypref ./raypref
RUN pip install --no-cache-dir --no-deps .

# Entry points and configs: the RayJob's working_dir is this folder.
COPY --chown=1000:100 jobs ./jobs
COPY --chown=1000:100 configs ./configs
