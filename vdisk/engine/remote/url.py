"""Backing names that name a remote image: URLs and QEMU's json: pseudo-paths.

Accepted, as QEMU's curl and nbd drivers accept them (block/curl.c, block/nbd.c):

* `http://...`, `https://...` (the curl driver: the name is the URL);
* `nbd://host[:port]/export` and `nbd+tcp://...` (port 10809 by default; the export is
  the path without its first slash), `nbd+unix:///export?socket=PATH`;
* `json:{...}` whose protocol node has driver http, https or nbd: either under "file"
  (`{"driver": "qcow2", "file": {"driver": "http", "url": ...}}`, or flattened
  `"file.driver"`, `"file.url"`), or at the top (`{"driver": "nbd", ...}`: then the
  protocol node is the image, read as raw). Keys: url (or filename), sslverify,
  timeout, readahead, cookie, username for http(s); server.{type,host,port,path},
  export and the legacy host/port/path for nbd.

Everything else is refused with ImageError(name, reason), the name redacted.
"""

from __future__ import annotations

import json
import re
import urllib.parse
from dataclasses import dataclass
from typing import Any

from vdisk.errors import ImageError

NBD_DEFAULT_PORT = 10809
READAHEAD_DEFAULT = 256 << 10  # QEMU's curl default
TIMEOUT_MAX = 10000  # QEMU's CURL_TIMEOUT_MAX (seconds)
DEFAULT_TIMEOUT = 30.0  # seconds a read may take, retries included, before it fails
CONNECT_TIMEOUT = 10.0  # seconds to connect (and, at open, to get the first answer)
HTTP_DRIVERS = ("http", "https")
DRIVERS = ("http", "https", "nbd")
FORMATS = ("qcow2", "raw")
_SCHEMES = {"http": "http", "https": "https", "nbd": "nbd", "nbd+tcp": "nbd", "nbd+unix": "nbd"}
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")
_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)[^/@\s\"?#]*@")
_COOKIE = re.compile(r"(\"(?:file\.)?cookie\"\s*:\s*)\"(?:[^\"\\]|\\.)*\"")
_HTTP_KEYS = {"driver", "url", "filename", "sslverify", "timeout", "readahead", "cookie",
              "username"}
_NBD_KEYS = {"driver", "filename", "export", "host", "port", "path", "reconnect-delay",
             "open-timeout"}  # and server.*, checked with the server's type
_UNSUPPORTED = {
    "password-secret": "QEMU secret objects are not supported; put user:password in the URL",
    "cookie-secret": "QEMU secret objects are not supported; give cookie",
    "proxy-username": "proxy credentials are not supported",
    "proxy-password-secret": "proxy credentials are not supported",
    "tls-creds": "NBD over TLS is not supported",
    "tls-hostname": "NBD over TLS is not supported",
    "x-dirty-bitmap": "x-dirty-bitmap is not supported",
}


@dataclass(frozen=True)
class SourceSpec:
    """Where a remote image is and how to read it. `url` may hold credentials: never put
    it in a message or a log line; `display` is the same URL without them."""

    driver: str  # "http", "https" or "nbd"
    url: str  # http(s): the URL to fetch; nbd: the canonical nbd:// or nbd+unix:// URL
    display: str  # url without user:password@ (safe for messages and logs)
    host: str | None = None  # nbd over TCP
    port: int | None = None
    socket_path: str | None = None  # nbd over a UNIX socket
    export: str = ""  # nbd export name ("" is the default export)
    sslverify: bool = True
    ca_file: str | None = None  # https: verify against this CA file, not the system store
    timeout: float | None = None  # per-read deadline in seconds (None: the source's default)
    readahead: int = READAHEAD_DEFAULT  # http(s): bytes fetched past a small read
    cookie: str | None = None  # http(s): sent with every request (a credential: never logged)
    username: str | None = None  # http(s): basic auth user (the password is in the URL)
    format: str | None = None  # the format driver a json: name gives, else None

    @property
    def key(self) -> str:
        """What identifies the image, for loop detection in a chain."""
        if self.driver == "nbd":
            return f"nbd:{self.socket_path or f'{self.host}:{self.port}'}/{self.export}"
        return self.url


def redact(text: str) -> str:
    """text with the user:password@ of every URL in it, and json: cookies, removed."""
    return _COOKIE.sub(r'\1"<redacted>"', _USERINFO.sub(r"\1", text))


def is_remote_name(name: str) -> bool:
    """True when a backing name names a remote image: a URL of a scheme vdisk reads, or a
    json: name of the http, https or nbd driver (parse() decides if it is good). Other
    protocols and json: names stay what the chain refuses as not plain files."""
    if name.startswith("json:"):
        try:
            doc = json.loads(name[len("json:"):])
        except ValueError:
            return False
        if not isinstance(doc, dict):
            return False
        flat: dict[str, Any] = {}
        _flatten(doc, "", flat)
        filename = flat.get("file.filename", flat.get("filename"))
        return (flat.get("file.driver", flat.get("driver")) in DRIVERS
                or "file.url" in flat
                or (isinstance(filename, str) and is_remote_name(filename)))
    m = _SCHEME.match(name)
    return m is not None and name[m.end():].startswith("//") and m.group(1) in _SCHEMES


def resolve_under(parent: SourceSpec, name: str) -> str:
    """The name a backing name of a remote image stands for: a URL or json: name as is; a
    relative name relative to an http(s) parent's URL. A local path is refused (a remote
    image must not make vdisk read local files), and so is a relative name under NBD
    (QEMU: NBD exports have no directory)."""
    if is_remote_name(name):
        return name
    where = f"backing file {redact(name)!r} of {parent.display}"
    if name.startswith("/") or name.startswith("file:"):
        raise ImageError(parent.display, f"{where} is a local file; a remote image may only "
                                         "name remote backing files")
    if parent.driver == "nbd":
        raise ImageError(parent.display, f"{where} is relative, and an NBD export has no "
                                         "directory to resolve it against")
    return urllib.parse.urljoin(parent.url, name)


def parse(name: str) -> SourceSpec:
    """The SourceSpec of a URL or json: backing name; ImageError(redacted name, reason)."""
    if name.startswith("json:"):
        return _parse_json(name)
    m = _SCHEME.match(name)
    if not m or not name[m.end():].startswith("//"):
        raise ImageError(redact(name), "not a URL (scheme://...)")
    scheme = m.group(1)
    if scheme not in _SCHEMES:
        raise ImageError(redact(name), f"unknown scheme '{scheme}' (http, https, nbd, "
                                       "nbd+tcp or nbd+unix)")
    if _SCHEMES[scheme] == "nbd":
        return _parse_nbd(name, scheme)
    return _parse_http(name, scheme, {})


def _bad(name: str, reason: str) -> ImageError:
    return ImageError(redact(name), reason)


def _parse_http(url: str, driver: str, opts: dict[str, Any]) -> SourceSpec:
    if not url.startswith(f"{driver}://"):
        raise _bad(url, f"the {driver} driver cannot handle this URL (it does not start with "
                        f"'{driver}://')")
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError as e:
        raise _bad(url, f"not a valid URL: {e}") from None
    if not parts.hostname:
        raise _bad(url, "the URL names no host")
    if any(c.isspace() for c in url):
        raise _bad(url, "the URL contains white space")
    kw: dict[str, Any] = {}
    if "sslverify" in opts:
        kw["sslverify"] = _bool(url, "sslverify", opts["sslverify"])
    if "timeout" in opts:
        t = _int(url, "timeout", opts["timeout"])
        if t < 0 or t > TIMEOUT_MAX:
            raise _bad(url, f"timeout {t} is out of range (0 to {TIMEOUT_MAX} seconds)")
        kw["timeout"] = float(t) if t else None
    if "readahead" in opts:
        ra = _size(url, "readahead", opts["readahead"])
        if ra % 512:
            raise _bad(url, f"readahead {ra} is not a multiple of 512")
        kw["readahead"] = ra
    for key in ("cookie", "username"):
        if key in opts:
            if not isinstance(opts[key], str):
                raise _bad(url, f"option '{key}' must be a string")
            kw[key] = opts[key]
    return SourceSpec(driver=driver, url=url, display=redact(url), **kw)


def _parse_nbd(url: str, scheme: str) -> SourceSpec:
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise _bad(url, f"not a valid NBD URL: {e}") from None
    export = urllib.parse.unquote(parts.path[1:] if parts.path.startswith("/") else parts.path)
    query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    if parts.fragment:
        raise _bad(url, "an NBD URL has no fragment (#...)")
    if scheme == "nbd+unix":
        if parts.netloc:
            raise _bad(url, "an nbd+unix URL names no host: nbd+unix:///EXPORT?socket=PATH")
        if len(query) != 1 or query[0][0] != "socket" or not query[0][1]:
            raise _bad(url, "an nbd+unix URL needs exactly one query parameter, socket=PATH")
        return _nbd_spec(None, None, query[0][1], export)
    if query:
        raise _bad(url, "an nbd URL takes no query parameters (nbd+unix takes socket=)")
    if not parts.hostname:
        raise _bad(url, "the NBD URL names no host: nbd://HOST[:PORT]/EXPORT")
    if parts.username is not None:
        raise _bad(url, "an NBD URL takes no user name or password")
    return _nbd_spec(parts.hostname, port or NBD_DEFAULT_PORT, None, export)


def _nbd_spec(host: str | None, port: int | None, path: str | None, export: str,
              **kw: Any) -> SourceSpec:
    quoted = urllib.parse.quote(export, safe="/:@")
    if path is not None:
        url = f"nbd+unix:///{quoted}?socket={path}"
    else:
        h = f"[{host}]" if host and ":" in host else host
        url = f"nbd://{h}:{port}/{quoted}"
    return SourceSpec(driver="nbd", url=url, display=url, host=host, port=port,
                      socket_path=path, export=export, **kw)


# -- json: ---------------------------------------------------------------------------

def _flatten(d: dict[str, Any], prefix: str, out: dict[str, Any]) -> None:
    """QEMU's qdict_flatten: nested objects become dotted keys."""
    for k, v in d.items():
        if isinstance(v, dict):
            _flatten(v, f"{prefix}{k}.", out)
        else:
            out[f"{prefix}{k}"] = v


def _parse_json(name: str) -> SourceSpec:
    try:
        doc = json.loads(name[len("json:"):])
    except ValueError as e:
        raise _bad(name, f"the json: name is not valid JSON ({e})") from None
    if not isinstance(doc, dict):
        raise _bad(name, "the json: name must be a JSON object")
    flat: dict[str, Any] = {}
    _flatten(doc, "", flat)
    fmt: str | None = None
    if "file.driver" in flat or "file.filename" in flat or "file.url" in flat:
        fmt = flat.pop("driver", None)
        if fmt is not None and fmt not in FORMATS:
            raise _bad(name, f"format driver '{fmt}' is not supported (qcow2 or raw)")
        extra = sorted(k for k in flat if not k.startswith("file."))
        if extra:
            raise _bad(name, f"option '{extra[0]}' is not supported in a remote json: name")
        opts = {k[len("file."):]: v for k, v in flat.items()}
    elif flat.get("driver") in DRIVERS:
        opts, fmt = flat, "raw"  # the protocol node is the image itself
    else:
        raise _bad(name, "json: names are supported for the drivers http, https and nbd "
                         f"only (driver {flat.get('driver', flat.get('file.driver'))!r})")
    return _json_protocol(name, opts, fmt)


def _json_protocol(name: str, opts: dict[str, Any], fmt: str | None) -> SourceSpec:
    driver = opts.get("driver")
    filename = opts.get("filename")
    if driver is None and isinstance(filename, str):
        m = _SCHEME.match(filename)
        driver = _SCHEMES.get(m.group(1)) if m else None
    if driver not in DRIVERS:
        raise _bad(name, f"protocol driver {driver!r} is not supported (http, https, nbd)")
    for key in opts:
        if key in _UNSUPPORTED:
            raise _bad(name, f"option '{key}': {_UNSUPPORTED[key]}")
        allowed = _HTTP_KEYS if driver in HTTP_DRIVERS else _NBD_KEYS
        if key not in allowed and not (driver == "nbd" and key.startswith("server.")):
            raise _bad(name, f"unknown option '{key}' for the {driver} driver")
    if driver in HTTP_DRIVERS:
        url = opts.get("url", filename)
        if "url" in opts and filename is not None:
            raise _bad(name, "give url or filename, not both")
        if not isinstance(url, str):
            raise _bad(name, f"the {driver} driver needs an 'url' option (a string)")
        spec = _parse_http(url, driver, opts)
    else:
        spec = _json_nbd(name, opts)
    return _with_format(spec, fmt)


def _json_nbd(name: str, o: dict[str, Any]) -> SourceSpec:
    kw: dict[str, Any] = {}  # open-timeout: accepted, vdisk's own applies
    if "reconnect-delay" in o:  # QEMU: how long requests wait for a lost server; here the
        t = _int(name, "reconnect-delay", o["reconnect-delay"])  # read deadline
        if t < 0 or t > TIMEOUT_MAX:
            raise _bad(name, f"reconnect-delay {t} is out of range (0 to {TIMEOUT_MAX} s)")
        kw["timeout"] = float(t) if t else None
    export = o.get("export", "")
    if not isinstance(export, str):
        raise _bad(name, "option 'export' must be a string")
    if "filename" in o:
        if any(k in o for k in ("export", "host", "port", "path")) or any(
                k.startswith("server.") for k in o):
            raise _bad(name, "option 'filename' cannot be combined with server or export")
        if not isinstance(o["filename"], str):
            raise _bad(name, "option 'filename' must be a string")
        spec = parse(o["filename"])
        return _nbd_spec(spec.host, spec.port, spec.socket_path, spec.export, **kw)
    legacy = {k: o[k] for k in ("host", "port", "path") if k in o}
    server = {k[len("server."):]: v for k, v in o.items() if k.startswith("server.")}
    if legacy and server:
        raise _bad(name, "cannot use 'server' and path/host/port at the same time")
    if legacy:
        if "path" in legacy and ("host" in legacy or "port" in legacy):
            raise _bad(name, "path and host/port may not be used at the same time")
        server = ({"type": "unix", "path": legacy["path"]} if "path" in legacy else
                  {"type": "inet", "host": legacy.get("host"),
                   "port": legacy.get("port", NBD_DEFAULT_PORT)})
    kind = server.get("type")
    if kind == "unix":
        path = server.get("path")
        if not isinstance(path, str) or not path or set(server) - {"type", "path"}:
            raise _bad(name, "a unix NBD server needs server.path (and nothing else)")
        return _nbd_spec(None, None, path, export, **kw)
    if kind == "inet":
        host = server.get("host")
        if not isinstance(host, str) or not host or set(server) - {"type", "host", "port"}:
            raise _bad(name, "an inet NBD server needs server.host and server.port")
        port = _int(name, "server.port", server.get("port", NBD_DEFAULT_PORT))
        if not 0 < port < 65536:
            raise _bad(name, f"server.port {port} is out of range")
        return _nbd_spec(host, port, None, export, **kw)
    if not server:
        raise _bad(name, "NBD server address missing (server.type and host/port or path)")
    raise _bad(name, f"NBD server type {kind!r} is not supported (inet or unix)")


def _with_format(spec: SourceSpec, fmt: str | None) -> SourceSpec:
    if fmt is None:
        return spec
    return SourceSpec(**{**spec.__dict__, "format": fmt})


def _bool(name: str, key: str, v: Any) -> bool:
    if isinstance(v, bool):
        return v
    if v in ("on", "true", "yes"):
        return True
    if v in ("off", "false", "no"):
        return False
    raise _bad(name, f"option '{key}' must be on or off, not {v!r}")


def _int(name: str, key: str, v: Any) -> int:
    if isinstance(v, bool):
        raise _bad(name, f"option '{key}' must be a number, not {v!r}")
    if isinstance(v, int):
        return v
    if isinstance(v, str) and re.fullmatch(r"[0-9]+", v):
        return int(v)
    raise _bad(name, f"option '{key}' must be a number, not {v!r}")


_SUFFIX = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def _size(name: str, key: str, v: Any) -> int:
    if isinstance(v, int) and not isinstance(v, bool) and v >= 0:
        return v
    m = re.fullmatch(r"([0-9]+)([bkmgtBKMGT]?)", v) if isinstance(v, str) else None
    if not m:
        raise _bad(name, f"option '{key}' must be a size (bytes, or with K/M/G), not {v!r}")
    return int(m.group(1)) * _SUFFIX[m.group(2).lower()]
