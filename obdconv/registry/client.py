"""A repository in an OCI/Docker registry, over oras-py's `Registry`.

Reused from oras: the requests session (with its cookie policy), `Container` URL building, upload
`Location` resolution, URL parameter appending and tag pagination. Replaced, each for a reason named where
it happens: the request loop and auth (`ObdRegistry`, session.py), manifest access, blob upload/download
and mounts (here).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterable, Iterator
from typing import BinaryIO

import oras.container
import oras.utils
import requests

from obdconv.errors import AuthError, BadInputError, IntegrityError, NetworkError, NotFoundError
from obdconv.oci.digests import sha256_digest
from obdconv.registry.auth import (
    ScopeAtom,
    repository_scope,
)
from obdconv.registry.bodies import RawSource, ResumingSource, SizedBody, rechunk
from obdconv.registry.options import RegistryOptions
from obdconv.registry.reference import check_digest, is_digest, parse_reference
from obdconv.registry.repository import (
    MANIFEST_MEDIA_TYPES,
    Manifest,
    PendingBlob,
    Repository,
    VerifyingReader,
    buffered,
    iter_file_chunks,
)
from obdconv.registry.session import ObdRegistry, registry_error_text

log = logging.getLogger(__name__)

# Pauses before re-pushing a manifest the registry refused with BLOB_UNKNOWN (see put_manifest).
MANIFEST_BLOB_UNKNOWN_DELAYS = (0.2, 0.5, 1.0, 2.0)

MAX_MANIFEST_BYTES = 4 << 20  # distribution's own limit for a manifest body
STREAM_MERGE_BELOW = 256 << 10  # streamed uploads merge pieces smaller than this (fewer tiny HTTP chunks)
_ACCEPT_MANIFESTS = ", ".join(MANIFEST_MEDIA_TYPES)


def _range_starts_at(response: requests.Response, offset: int) -> bool:
    """A 206 answer's Content-Range begins at `offset` (the byte the request asked for)."""
    return response.headers.get("Content-Range", "").removeprefix("bytes ").partition("-")[0] == str(offset)


def _container(endpoint: str, repository: str) -> oras.container.Container:
    """oras' Container, with the repository set explicitly: its regex would take a dotted first path
    component (e.g. "my.org/app") for a registry host."""
    container = oras.container.Container(f"{endpoint}/{repository}")
    namespace, _, last = repository.rpartition("/")
    container.registry = endpoint
    container.namespace = namespace or None
    container.repository = last
    container.tag = None
    container.digest = None
    return container


class RegistryRepository(Repository):
    """One repository of a registry reached over HTTP(S)."""

    def __init__(self, host: str, name: str, options: RegistryOptions, registry: ObdRegistry | None = None) -> None:
        self.host = host
        self.name = name
        self.options = options
        self._registry = registry or ObdRegistry(host, options)
        self._container = _container(self._registry.hostname or host, name)

    def __repr__(self) -> str:
        return f"RegistryRepository({self.host}/{self.name})"

    # -- helpers ------------------------------------------------------------------------------------------

    def _url(self, kind: str, ref: str = "") -> str:
        return f"{self._registry.prefix}://{self._registry.hostname}/v2/{self.name}/{kind}/{ref}"

    def _where(self, ref: str) -> str:
        sep = "@" if is_digest(ref) else ":"
        return f"{self.host}/{self.name}{sep}{ref}"

    def _unexpected(self, response: requests.Response, what: str) -> BadInputError:
        return BadInputError(f"{what}: registry answered {registry_error_text(response)}")

    # -- manifests ----------------------------------------------------------------------------------------

    def get_manifest(self, ref: str) -> Manifest:
        # oras' get_manifest returns parsed JSON, accepts only the OCI manifest type and validates against
        # the OCI manifest schema; conversion needs the exact bytes of any of the four types.
        response = self._registry.do_request(self._url("manifests", ref), "GET",
                                             headers={"Accept": _ACCEPT_MANIFESTS}, stream=True)
        with response:
            if response.status_code == 404:
                raise NotFoundError(f"manifest {self._where(ref)} not found: {registry_error_text(response)}")
            if response.status_code != 200:
                raise self._unexpected(response, f"manifest {self._where(ref)}")
            data = response.raw.read(MAX_MANIFEST_BYTES + 1, decode_content=True)
            if len(data) > MAX_MANIFEST_BYTES:
                raise BadInputError(f"manifest {self._where(ref)} is larger than {MAX_MANIFEST_BYTES} bytes")
            header_type = response.headers.get("Content-Type", "").split(";")[0].strip()
            header_digest = response.headers.get("Docker-Content-Digest", "")
        digest = sha256_digest(data)
        if is_digest(ref) and digest != ref:
            raise IntegrityError(f"manifest {self._where(ref)}: content has digest {digest}")
        if header_digest.startswith("sha256:") and header_digest != digest:
            raise IntegrityError(f"manifest {self._where(ref)}: registry says {header_digest}, content is {digest}")
        media_type = header_type if header_type in MANIFEST_MEDIA_TYPES else _media_type_from_json(data)
        if not media_type:
            raise BadInputError(f"manifest {self._where(ref)} has unknown media type {header_type!r}")
        return Manifest(media_type, data, digest)

    def head_manifest(self, ref: str) -> str | None:
        response = self._registry.do_request(self._url("manifests", ref), "HEAD",
                                             headers={"Accept": _ACCEPT_MANIFESTS})
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            raise self._unexpected(response, f"manifest {self._where(ref)}")
        digest = response.headers.get("Docker-Content-Digest", "")
        return digest if digest else self.get_manifest(ref).digest

    def put_manifest(self, data: bytes, media_type: str, ref: str | None = None) -> str:
        # oras' upload_manifest validates against the OCI manifest schema only (indexes and Docker
        # manifests are rejected) and re-serialises a dict; the digest must be of these exact bytes.
        digest = sha256_digest(data)
        ref = ref or digest
        if is_digest(ref) and ref != digest:
            raise IntegrityError(f"manifest for {self._where(ref)}: bytes have digest {digest}")
        for delay in (*MANIFEST_BLOB_UNKNOWN_DELAYS, None):
            response = self._registry.do_request(self._url("manifests", ref), "PUT", data=bytes(data),
                                                 headers={"Content-Type": media_type})
            with response:
                if response.status_code in (200, 201):
                    stored = response.headers.get("Docker-Content-Digest", "")
                    break
                if delay is not None and response.status_code == 400 and "BLOB_UNKNOWN" in response.text:
                    # distribution's storage rewrites a repository's blob link in place when another
                    # upload of the same digest commits (two requests converting the same layer), so
                    # for a moment a blob we just uploaded reads as unknown. A missing blob still
                    # fails, after these few seconds.
                    log.info("pushing manifest %s: a blob reads as unknown, trying again in %.1f s",
                             self._where(ref), delay)
                    time.sleep(delay)
                    continue
                raise self._unexpected(response, f"pushing manifest {self._where(ref)}")
        if stored.startswith("sha256:") and stored != digest:
            raise IntegrityError(f"manifest {self._where(ref)}: registry stored {stored}, sent {digest}")
        return digest

    def delete_manifest(self, ref: str) -> None:
        """Deletes the manifest `ref` resolves to (with every tag pointing at it: the API deletes by digest)."""
        digest = ref if is_digest(ref) else self.head_manifest(ref)
        if digest is None:
            raise NotFoundError(f"manifest {self._where(ref)} not found")
        response = self._registry.do_request(self._url("manifests", digest), "DELETE")
        with response:
            if response.status_code == 404:
                raise NotFoundError(f"manifest {self._where(digest)} not found")
            if response.status_code not in (200, 202):
                raise self._unexpected(response, f"deleting manifest {self._where(digest)}")

    def list_tags(self) -> list[str]:
        return list(self._registry.get_tags(self._container))

    # -- blobs --------------------------------------------------------------------------------------------

    def head_blob(self, digest: str) -> int | None:
        check_digest(digest)
        response = self._registry.do_request(self._url("blobs", digest), "HEAD")
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            raise self._unexpected(response, f"blob {self._where(digest)}")
        return int(response.headers.get("Content-Length", "0"))

    def open_blob(self, digest: str) -> BinaryIO:
        # oras' get_blob returns a bare response and download_blob writes a file without verifying.
        check_digest(digest)
        what = f"blob {self._where(digest)}"
        response = self._registry.do_request(self._url("blobs", digest), "GET", stream=True)
        if response.status_code == 404:
            response.close()
            raise NotFoundError(f"{what} not found")
        if response.status_code != 200:
            response.close()
            raise self._unexpected(response, what)
        length = response.headers.get("Content-Length")
        encoded = response.headers.get("Content-Encoding", "identity") not in ("", "identity")
        size = int(length) if length is not None and not encoded else None
        # Byte offsets of an encoded body are not the blob's: such a download cannot be resumed.
        attempts = 0 if encoded else self.options.resume_attempts
        source = ResumingSource(RawSource(response, what), lambda offset: self._blob_from(digest, offset, what),
                                attempts, what)
        return buffered(VerifyingReader(source, digest, size, what))

    def _blob_from(self, digest: str, offset: int, what: str) -> RawSource:
        """The rest of a blob from `offset` on, for a download that broke there."""
        response = self._registry.do_request(self._url("blobs", digest), "GET", stream=True,
                                             headers={"Range": f"bytes={offset}-"})
        if response.status_code == 206:
            if _range_starts_at(response, offset):
                return RawSource(response, what)
            response.close()
            raise NetworkError(f"{what}: resuming at byte {offset}, the registry answered with range "
                               f"{response.headers.get('Content-Range')!r}")
        if response.status_code == 200:  # Range ignored: skip what was read already
            source = RawSource(response, what)
            left = offset
            while left > 0:
                skipped = len(source.read(min(left, 1 << 20)))
                if not skipped:
                    break
                left -= skipped
            return source
        response.close()
        if response.status_code == 404:
            raise NotFoundError(f"{what} not found (resuming at byte {offset})")
        raise self._unexpected(response, f"{what} (resuming at byte {offset})")

    def read_blob_range(self, digest: str, offset: int, length: int) -> bytes:
        check_digest(digest)
        if length <= 0:
            return b""
        what = f"blob {self._where(digest)} bytes {offset}+{length}"
        # Streamed, so that a 416 body is never read: docker-registry sends it with the whole
        # blob's Content-Length, and reading it fails as a truncated response.
        response = self._registry.do_request(self._url("blobs", digest), "GET", stream=True,
                                             headers={"Range": f"bytes={offset}-{offset + length - 1}"})
        with response:
            if response.status_code == 404:
                raise NotFoundError(f"{what}: blob not found")
            if response.status_code == 416:  # starts at or beyond the end
                return b""
            if response.status_code == 206:
                if not _range_starts_at(response, offset):
                    raise NetworkError(f"{what}: the registry answered with range "
                                       f"{response.headers.get('Content-Range')!r}")
                return RawSource(response, what).read()[:length]
            if response.status_code == 200:  # a server that ignores Range sends the whole blob
                return RawSource(response, what).read()[offset:offset + length]
            raise self._unexpected(response, what)

    def delete_blob(self, digest: str) -> None:
        check_digest(digest)
        response = self._registry.do_request(self._url("blobs", digest), "DELETE")
        with response:
            if response.status_code == 404:
                raise NotFoundError(f"blob {self._where(digest)} not found")
            if response.status_code not in (200, 202):
                raise self._unexpected(response, f"deleting blob {self._where(digest)}")

    def upload_blob(self, chunks: Iterable[bytes], size: int | None = None) -> tuple[str, int]:
        return self._upload(chunks, expected_size=size)

    def push_blob(self, f: BinaryIO, digest: str, size: int) -> None:
        check_digest(digest)
        if self.head_blob(digest) is not None:
            log.debug("blob %s exists", self._where(digest))
            return
        self._upload(iter_file_chunks(f, self.options.upload_chunk_size), digest, size)

    def mount_blob(self, digest: str, from_repo: str) -> bool:
        # oras has no cross-repository mount.
        check_digest(digest)
        source = self._same_registry_repository(from_repo)
        if source is None or source == self.name:
            return False
        wanted = repository_scope(self.name, "pull", "push") | repository_scope(source, "pull")
        url = oras.utils.append_url_params(self._url("blobs", "uploads/"), {"mount": digest, "from": source})
        try:
            response = self._registry.do_request(url, "POST", scopes=wanted)
        except AuthError as e:
            # A token without pull on the source (the token server grants only part of the scope) makes
            # distribution answer 401 insufficient_scope instead of 202: same meaning, upload instead.
            log.info("mount of %s from %s refused (%s); will upload", digest, source, e)
            return False
        with response:
            if response.status_code == 201:
                return True
            if response.status_code == 202:
                self._cancel_upload(response)
                return False
            raise self._unexpected(response, f"mounting {digest} from {source} into {self.host}/{self.name}")

    def _same_registry_repository(self, from_repo: str) -> str | None:
        """`from_repo` as a repository path on this registry, or None if it is on another registry."""
        if "/" in from_repo:
            first = from_repo.split("/", 1)[0]
            if "." in first or ":" in first or first == "localhost":
                reference = parse_reference(from_repo)
                return reference.repository if reference.host == self.host else None
        return from_repo

    def _session_url(self, response: requests.Response) -> str:
        location = self._registry._get_location(response, self._container)
        if not location:
            raise self._unexpected(response, f"upload to {self.host}/{self.name}: no Location")
        return location

    def _cancel_upload(self, response: requests.Response) -> None:
        try:
            location = self._session_url(response)
            self._registry.do_request(location, "DELETE", scopes=repository_scope(self.name, "pull", "push"),
                                      retry=False).close()
        except (BadInputError, AuthError, NetworkError) as e:
            log.info("could not cancel upload session in %s/%s: %s", self.host, self.name, e)

    def begin_upload(self, chunks: Iterable[bytes], size: int | None = None) -> PendingBlob:
        return self._send(chunks, expected_size=size)

    def _upload(self, chunks: Iterable[bytes], expected_digest: str | None = None,
                expected_size: int | None = None) -> tuple[str, int]:
        pending = self._send(chunks, expected_digest, expected_size)
        pending.commit()
        return pending.digest, pending.size

    def _send(self, chunks: Iterable[bytes], expected_digest: str | None = None,
              expected_size: int | None = None) -> PendingBlob:
        """POST a session, send the bytes with PATCH (`_send_body`). When the network breaks the
        body and `chunks` can be iterated again (any iterable that is not an iterator, e.g. a list or
        a `ChunkSource`), it is sent again in a new session, at most `resume_attempts` times (a
        session a broken PATCH wrote into cannot be resumed: docker-registry then refuses its state)."""
        scopes = repository_scope(self.name, "pull", "push")
        what = f"upload to {self.host}/{self.name}"
        restarts = 0
        while True:
            response = self._registry.do_request(self._url("blobs", "uploads/"), "POST", scopes=scopes)
            with response:
                if response.status_code != 202:
                    raise self._unexpected(response, what)
                location = self._session_url(response)
            try:
                return self._send_body(location, chunks, scopes, what, expected_digest, expected_size)
            except NetworkError as e:
                if isinstance(chunks, Iterator) or restarts >= self.options.resume_attempts:
                    raise
                restarts += 1
                log.info("%s broken (%s); sending it again (%d of %d)", what, e, restarts,
                         self.options.resume_attempts)

    def _send_body(self, location: str, chunks: Iterable[bytes], scopes: set[ScopeAtom], what: str,
                   expected_digest: str | None, expected_size: int | None) -> PendingBlob:
        """Send the bytes into the session at `location`; the PendingBlob's commit PUTs ?digest=
        (computed while sending), its cancel DELETEs the session (also done here on any failure).

        oras' upload_blob reads the whole file into memory (monolithic) or needs a file path (chunked);
        this streams any iterable with at most `upload_chunk_size` bytes buffered. Default mode "stream":
        one PATCH with a chunked-transfer body, as `docker push` does (distribution's streamed upload; it
        lets the registry write while we hash and send, about twice as fast as waiting for each chunk).
        Mode "chunks": one PATCH per chunk with Content-Range, for registries that refuse streamed bodies.

        With `expected_size` known (and > 0) the streamed PATCH carries it as Content-Length instead of a
        chunked Transfer-Encoding: urllib3 frames every chunk of a chunked body with `b"%x\\r\\n%b\\r\\n" %`,
        a fresh copy of each piece (measured: ~0.6 s of client CPU per GiB, a third of the upload's cost).
        """
        hasher = hashlib.sha256()
        sent = 0
        limit = self.options.upload_chunk_size
        # Streamed: any piece size works, so big pieces go through uncopied and only small ones are merged.
        parts = rechunk(chunks, limit, STREAM_MERGE_BELOW if self.options.upload_mode == "stream" else None)
        try:
            if self.options.upload_mode == "stream":

                mismatch = ""

                def body() -> Iterator[bytes]:
                    nonlocal sent, mismatch
                    for part in parts:
                        if expected_size is not None and sent + len(part) > expected_size:
                            mismatch = f"more than the expected {expected_size} bytes"
                            break
                        hasher.update(part)
                        sent += len(part)
                        yield part
                    if expected_size and sent != expected_size:
                        mismatch = mismatch or f"{sent} bytes, expected {expected_size}"
                        # Complete the announced Content-Length with zeros, then cancel the session
                        # (below): aborting mid-body instead races the registry, which may still write
                        # the partial body into the session after our DELETE has removed it.
                        for at in range(sent, expected_size, STREAM_MERGE_BELOW):
                            yield bytes(min(STREAM_MERGE_BELOW, expected_size - at))

                stream: Iterable[bytes] = body()
                if expected_size:
                    stream = SizedBody(stream, expected_size)
                location = self._patch(location, stream, {}, scopes, what)
                if mismatch:
                    raise IntegrityError(f"{what}: {mismatch}")
            else:
                for part in parts:
                    hasher.update(part)
                    location = self._patch(location, part, {"Content-Range": f"{sent}-{sent + len(part) - 1}"},
                                           scopes, what)
                    sent += len(part)
            digest = "sha256:" + hasher.hexdigest()
            if expected_size is not None and sent != expected_size:
                blob = f"blob {expected_digest}" if expected_digest else "blob"
                raise IntegrityError(f"{what}: {blob} had {sent} bytes, expected {expected_size}")
            if expected_digest is not None and digest != expected_digest:
                raise IntegrityError(f"{what}: content has digest {digest}, expected {expected_digest}")
        except BaseException:
            self._cancel_location(location, scopes)
            raise
        return PendingBlob(digest, sent, lambda: self._commit(location, digest, scopes, what),
                           lambda: self._cancel_location(location, scopes))

    def _commit(self, location: str, digest: str, scopes: set[ScopeAtom], what: str) -> None:
        """PUT ?digest=: the sent bytes become blob `digest` (cancels the session if that fails).
        Retried within the budget; a retry answered 404 (the session is gone) succeeded if the blob
        exists: an earlier attempt committed it and only its answer was lost."""
        try:
            final = oras.utils.append_url_params(location, {"digest": digest})
            response = self._registry.do_request(final, "PUT", data=b"", scopes=scopes,
                                                 headers={"Content-Type": "application/octet-stream"})
            with response:
                if response.status_code == 404 and self.head_blob(digest) is not None:
                    return
                if response.status_code != 201:
                    raise self._unexpected(response, f"{what}: committing {digest}")
        except BaseException:
            self._cancel_location(location, scopes)
            raise

    def _patch(self, location: str, body: bytes | Iterable[bytes], headers: dict[str, str],
               scopes: set[ScopeAtom], what: str) -> str:
        """One PATCH; returns the next session URL. Not retried: a failed PATCH leaves the session at an
        unknown offset (the caller's caller retries the whole upload)."""
        response = self._registry.do_request(location, "PATCH", data=body, scopes=scopes, retry=False,
                                             headers={"Content-Type": "application/octet-stream", **headers})
        with response:
            if response.status_code != 202:
                raise self._unexpected(response, what)
            return self._session_url(response)

    def _cancel_location(self, location: str, scopes: set[ScopeAtom]) -> None:
        try:
            self._registry.do_request(location, "DELETE", scopes=scopes, retry=False).close()
        except (AuthError, NetworkError, BadInputError):
            pass  # best effort: the registry purges abandoned sessions itself

    def close(self) -> None:
        self._registry.session.close()


def _media_type_from_json(data: bytes) -> str:
    try:
        value = json.loads(data).get("mediaType", "")
    except (ValueError, RecursionError, AttributeError):
        return ""
    return value if value in MANIFEST_MEDIA_TYPES else ""
