"""The rbd source: a Ceph RBD image, or a snapshot of one (exported read-only), through librbd.

Requests go through librbd's asynchronous calls: a request submits one aio call, and librbd's
callback thread hands the completion back to trio with `run_sync_soon`, so no thread of ours is
spent per request. Reads, writes and flushes are started without a task (start_pread and
friends): the connection replies from the completion. Only what librbd offers solely as blocking calls (connect, open,
close, diff_iterate) runs in a worker thread.

Ceph's Python bindings (Debian's python3-rados and python3-rbd; PyPI has no usable ones) are
imported only when an rbd source is configured, so nbdserve runs without Ceph installed.
"""

import errno
import os
from dataclasses import dataclass
from pathlib import Path

import outcome
import trio

from nbdserve.backend import BackendError, Capabilities, Done, Extent, OpenOptions
from nbdserve.registry import ParseContext
from nbdserve.settings import ConfigError, Section

DEFAULT_TIMEOUT = 30
# Block status asks librbd about at most this much at a time: with fast-diff that is a look at
# the object map, but an object map found invalid later makes librbd check object by object.
_EXTENTS_SPAN = 1 << 30
# Options of QEMU's `rbd:` syntax and the settings they mean here.
_SPEC_OPTIONS = {"conf": "conf", "id": "user", "mon_host": "mon-host", "keyring": "keyring"}


def ceph_bindings():
    """Ceph's `rados` and `rbd` modules, or a BackendError that says what to install."""
    try:
        import rados
        import rbd
    except ImportError as exc:
        raise BackendError(
            errno.ENOPKG,
            f"the rbd backend needs Ceph's Python bindings (Debian: apt install python3-rados "
            f"python3-rbd): {exc}",
        ) from exc
    return rados, rbd


@dataclass(frozen=True)
class RbdConfig:
    pool: str
    image: str
    namespace: str = ""
    snapshot: str | None = None
    user: str | None = None  # the Ceph client id: "admin" means client.admin
    conf: Path | None = None  # ceph.conf; without it and mon_host, Ceph's default search
    mon_host: str | None = None
    keyring: Path | None = None
    timeout: int = DEFAULT_TIMEOUT  # seconds Ceph gets to connect, open and answer a request

    def __str__(self) -> str:
        path = "/".join(part for part in (self.pool, self.namespace, self.image) if part)
        return f"{path}@{self.snapshot}" if self.snapshot else path


class RbdDriver:
    name = "rbd"

    def claims(self, spec: str) -> dict | None:
        """QEMU's `rbd:POOL/[NAMESPACE/]IMAGE[@SNAP][:conf=FILE][:id=USER][:mon_host=..][:keyring=..]`."""
        if not spec.startswith("rbd:"):
            return None
        return settings_from_spec(spec)

    def parse(self, section: Section, context: ParseContext) -> RbdConfig:
        config = RbdConfig(
            pool=_name(section, "pool"),
            image=_name(section, "image"),
            namespace=section.str("namespace", ""),
            snapshot=section.str("snapshot"),
            user=section.str("user"),
            conf=_path(section, "conf", context),
            mon_host=section.str("mon-host"),
            keyring=_path(section, "keyring", context),
            timeout=section.int("timeout", DEFAULT_TIMEOUT, minimum=1),
        )
        try:
            ceph_bindings()
        except BackendError as exc:
            raise section.error("driver", exc.strerror) from None
        return config

    async def open(self, config: RbdConfig, options: OpenOptions) -> "RbdBackend":
        image = await trio.to_thread.run_sync(OpenImage.connect, config, options)
        return RbdBackend(image, config, options)


def _name(section: Section, key: str) -> str:
    value = section.str(key, required=True)
    if not value:
        raise section.error(key, "must not be empty")
    return value


def _path(section: Section, key: str, context: ParseContext) -> Path | None:
    value = section.str(key)
    if value is None:
        return None
    path = Path(value)
    return path if path.is_absolute() else context.base_dir / path


# QEMU's `rbd:` syntax: `:` separates options, `/` pool, namespace and image, `@` the snapshot;
# a backslash makes the next character literal.


def settings_from_spec(spec: str) -> dict:
    def fail(message: str) -> ConfigError:
        return ConfigError("", f"{spec!r}: {message}")

    location, *options = _split(spec[len("rbd:") :], ":")
    path, *snapshot = _split(location, "@")
    parts = [_unescape(part) for part in _split(path, "/")]
    if len(snapshot) > 1 or len(parts) not in (2, 3) or not all(parts):
        raise fail("expected rbd:POOL/IMAGE, rbd:POOL/NAMESPACE/IMAGE, optionally @SNAPSHOT")
    settings = {"driver": "rbd", "pool": parts[0], "image": parts[-1]}
    if len(parts) == 3:
        settings["namespace"] = parts[1]
    if snapshot:
        settings["snapshot"] = _unescape(snapshot[0])
    for option in options:
        key, equals, value = option.partition("=")
        if key not in _SPEC_OPTIONS or not equals:
            raise fail(f"unknown option {option!r} (expected {', '.join(f'{k}=' for k in _SPEC_OPTIONS)})")
        settings[_SPEC_OPTIONS[key]] = _unescape(value)
    return settings


def _split(text: str, separator: str) -> list[str]:
    """Split at separators not escaped by a backslash; escapes stay for `_unescape`."""
    pieces, current, escaped = [], [], False
    for char in text:
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == separator:
            pieces.append("".join(current))
            current = []
            continue
        current.append(char)
    pieces.append("".join(current))
    return pieces


def _unescape(text: str) -> str:
    result, escaped = [], False
    for char in text:
        if char == "\\" and not escaped:
            escaped = True
            continue
        escaped = False
        result.append(char)
    return "".join(result)


def _ceph_settings(config: RbdConfig, options: OpenOptions) -> dict[str, str]:
    """Ceph options for this client: where the cluster is, how long to wait, librbd's cache."""
    settings = {}
    if config.mon_host:
        settings["mon_host"] = config.mon_host
    if config.keyring:
        settings["keyring"] = str(config.keyring)
    # Connecting waits for a monitor (client_mount_timeout, then mon ops); opening the image
    # and every request after wait for OSDs (rados_osd_op_timeout, fixed at connect time).
    # Without these a cluster that does not answer hangs the server's start for 300 s or more.
    for key in ("client_mount_timeout", "rados_mon_op_timeout", "rados_osd_op_timeout"):
        settings[key] = str(config.timeout)
    # Cache modes as QEMU maps them: none and directsync bypass librbd's cache; writethrough
    # keeps it for reads but completes a write only once the OSDs have it.
    settings["rbd_cache"] = "false" if options.cache.direct else "true"
    if options.cache.sync_writes and not options.cache.direct:
        settings["rbd_cache_policy"] = "writethrough"
    return settings


class OpenImage:
    """A cluster connection, pool context and image handle, opened and closed together."""

    def __init__(self, cluster, ioctx, image) -> None:
        self.cluster = cluster
        self.ioctx = ioctx
        self.image = image

    @classmethod
    def connect(cls, config: RbdConfig, options: OpenOptions) -> "OpenImage":
        """Blocking: run in a worker thread. Errors say which part is missing or unreachable."""
        rados, rbd = ceph_bindings()
        # '' reads Ceph's default config (CEPH_CONF, /etc/ceph/ceph.conf); None reads none.
        conffile = str(config.conf) if config.conf else (None if config.mon_host else "")
        user = config.user or "admin"
        try:
            cluster = rados.Rados(rados_id=user, conffile=conffile)
        except rados.Error as exc:
            raise _error(exc, f"cannot read the Ceph config {conffile or '(default)'}") from exc
        for key, value in _ceph_settings(config, options).items():
            try:
                cluster.conf_set(key, value)
            except rados.Error as exc:
                cluster.shutdown()
                raise _error(exc, f"Ceph rejects the setting {key}={value!r}") from exc
        ioctx = image = None
        try:
            try:
                cluster.connect()
            except rados.TimedOut as exc:
                where = config.mon_host or f"the monitors in {conffile or 'the default Ceph config'}"
                raise _error(exc, f"cannot reach the Ceph cluster at {where} within {config.timeout} s") from exc
            except rados.Error as exc:
                raise _error(exc, f"cannot connect to the Ceph cluster as client.{user}") from exc
            try:
                ioctx = cluster.open_ioctx(config.pool)
            except rados.ObjectNotFound as exc:
                raise _error(exc, f"pool {config.pool!r} does not exist") from exc
            ioctx.set_namespace(config.namespace)
            read_only = options.read_only or config.snapshot is not None
            try:
                image = rbd.Image(ioctx, config.image, snapshot=config.snapshot, read_only=read_only)
            except rbd.ImageNotFound as exc:
                raise _error(exc, f"image {str(config)!r} does not exist") from exc
            except (rbd.Error, rados.Error) as exc:
                raise _error(exc, f"cannot open image {str(config)!r}") from exc
            return cls(cluster, ioctx, image)
        except BaseException:
            cls(cluster, ioctx, image).close()
            raise

    def close(self) -> None:
        """Blocking: closing the image writes back librbd's cache and releases its lock."""
        try:
            if self.image is not None:
                self.image.close()
        finally:
            if self.ioctx is not None:
                self.ioctx.close()
            self.cluster.shutdown()


def _writable(buf) -> bytes | bytearray:
    # The binding takes bytes or bytearray; the caller holds `buf` until the write completes,
    # and librbd may write straight from that memory.
    return buf if isinstance(buf, (bytes, bytearray)) else bytes(buf)


def _error(exc: Exception, message: str) -> BackendError:
    code = getattr(exc, "errno", None) or errno.EIO
    return BackendError(code, f"{message}: {os.strerror(code)}")


class RbdBackend:
    def __init__(self, handle: OpenImage, config: RbdConfig, options: OpenOptions) -> None:
        _, rbd = ceph_bindings()
        self._handle = handle
        self._image = handle.image
        self._name = str(config)
        self._rbd_error = rbd.Error
        self._token = trio.lowlevel.current_trio_token()
        self._size = self._image.size()
        features, flags = self._image.features(), self._image.flags()
        fast_diff = features & rbd.RBD_FEATURE_FAST_DIFF and not flags & rbd.RBD_FLAG_FAST_DIFF_INVALID
        self._thick_zero = rbd.RBD_WRITE_ZEROES_FLAG_THICK_PROVISION
        writable = not options.read_only and config.snapshot is None
        self.capabilities = Capabilities(
            can_write=writable,
            can_flush=writable,
            can_trim=writable,
            can_zero=writable,
            # Zeroing removes or truncates objects on the OSDs; only NO_HOLE writes zeroes.
            can_fast_zero=writable,
            # Without fast-diff, diff_iterate reads every object: report everything as data.
            can_extents=bool(fast_diff),
            # Every connection to this export shares this one image handle: one librbd cache
            # (whatever rbd_cache and its policy say) and one exclusive-lock owner. A flush
            # (rbd_aio_flush) therefore covers the writes every connection completed before
            # it, and all connections read the same data. Before librbd hands the exclusive
            # lock to another client it writes back this handle's cache, so no setting of
            # either makes connections disagree. Per-connection handles with rbd_cache on
            # would have private caches: then multi-conn would be false.
            can_multi_conn=True,
            block_size_preferred=4096,
        )

    def get_size(self) -> int:
        return self._size

    def _submit(self, what: str, submit, args: tuple, options: dict, on_result) -> None:
        """Submit one librbd aio call; `on_result(return value, extra args)` then runs on the
        event loop."""
        token = self._token

        def oncomplete(completion, *extra) -> None:  # in librbd's callback thread
            token.run_sync_soon(on_result, completion.get_return_value(), extra)

        try:
            submit(*args, oncomplete, **options)
        except self._rbd_error as exc:
            raise _error(exc, f"{what} on rbd image {self._name!r} failed") from exc

    def _failure(self, what: str, result: int) -> BackendError:
        return BackendError(-result, f"{what} on rbd image {self._name!r} failed: {os.strerror(-result)}")

    async def _complete(self, what: str, submit, *args, **options) -> tuple:
        """Submit one librbd aio call and wait for its completion: (return value, extra args)."""
        task = trio.lowlevel.current_task()
        self._submit(what, submit, args, options,
                     lambda result, extra: trio.lowlevel.reschedule(task, outcome.Value((result, extra))))
        # librbd cannot take a request back and may still use its buffer, so a cancelled
        # request still waits for its completion (bounded by the timeout setting).
        result, extra = await trio.lowlevel.wait_task_rescheduled(lambda _: trio.lowlevel.Abort.FAILED)
        if result < 0:
            raise self._failure(what, result)
        return result, extra

    def _start(self, what: str, submit, args: tuple, done: Done, finish=None) -> bool:
        """Submit one librbd aio call for a request started without a task: `finish(extra)`
        completes it on success, then `done` gets the outcome."""
        def on_result(result: int, extra: tuple, _pinned=args) -> None:
            # _pinned: the arguments (a write's bytes) live until librbd is done with them.
            if result < 0:
                done(self._failure(what, result))
                return
            try:
                if finish is not None:
                    finish(extra)
            except OSError as exc:
                done(exc)
                return
            done(None)

        try:
            self._submit(what, submit, args, {}, on_result)
        except BackendError:
            return False  # the async method meets the same error and reports it
        return True

    async def pread(self, buf: memoryview, offset: int) -> None:
        _, (data,) = await self._complete("read", self._image.aio_read, offset, len(buf))
        self._fill(buf, data, offset)

    def start_pread(self, buf: memoryview, offset: int, done: Done) -> bool:
        return self._start("read", self._image.aio_read, (offset, len(buf)), done,
                           lambda extra: self._fill(buf, extra[0], offset))

    def _fill(self, buf: memoryview, data: bytes, offset: int) -> None:
        if len(data) != len(buf):
            raise BackendError(errno.EIO, f"short read from rbd image {self._name!r} at {offset}")
        buf[:] = data

    async def pwrite(self, buf, offset: int, *, fua: bool = False) -> None:
        await self._complete("write", self._image.aio_write, _writable(buf), offset)

    def start_pwrite(self, buf, offset: int, fua: bool, done: Done) -> bool:
        return self._start("write", self._image.aio_write, (_writable(buf), offset), done)

    def start_flush(self, done: Done) -> bool:
        return self._start("flush", self._image.aio_flush, (), done)

    async def flush(self) -> None:
        await self._complete("flush", self._image.aio_flush)

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        # librbd skips discards of partial objects (rbd_skip_partial_discard): TRIM is a hint.
        await self._complete("discard", self._image.aio_discard, offset, length)

    async def zero(self, offset: int, length: int, *, may_trim: bool = False, fast: bool = False,
                   fua: bool = False) -> None:
        if may_trim:
            await self._complete("write_zeroes", self._image.aio_write_zeroes, offset, length)
            return
        # NO_HOLE: the range must stay allocated, so librbd writes real zeroes (as QEMU asks
        # for with thick provisioning); that is no faster than a write.
        if fast:
            raise BackendError(errno.EOPNOTSUPP, "zeroing without holes is not faster than writing")
        await self._complete(
            "write_zeroes", self._image.aio_write_zeroes, offset, length, zero_flags=self._thick_zero
        )

    async def extents(self, offset: int, length: int) -> list[Extent]:
        length = min(length, _EXTENTS_SPAN, self._size - offset)
        allocated = await trio.to_thread.run_sync(self._allocated, offset, length)
        result, position, end = [], offset, offset + length
        for start, size in allocated:
            start, stop = max(start, position), min(start + size, end)
            if start > position:
                result.append(Extent(start - position, hole=True, zero=True))
            if stop > start:
                result.append(Extent(stop - start))
                position = stop
        if position < end:
            result.append(Extent(end - position, hole=True, zero=True))
        return result

    def _allocated(self, offset: int, length: int) -> list[tuple[int, int]]:
        """Objects that exist (here or in a parent), whole, in image order."""
        found: list[tuple[int, int]] = []
        try:
            self._image.diff_iterate(
                offset, length, None, lambda start, size, exists: found.append((start, size)),
                include_parent=True, whole_object=True,
            )
        except self._rbd_error as exc:
            raise _error(exc, f"block status of rbd image {self._name!r} failed") from exc
        return sorted(found)

    async def close(self) -> None:
        if self._handle is not None:
            handle, self._handle = self._handle, None
            await trio.to_thread.run_sync(handle.close)
