"""Backing names of remote images: URLs and json: names parsed as QEMU's curl and nbd
drivers read them (block/curl.c, block/nbd.c), and credentials kept out of messages."""

from __future__ import annotations

import json

import pytest

from vdisk.engine.remote.url import (
    NBD_DEFAULT_PORT,
    READAHEAD_DEFAULT,
    is_remote_name,
    parse,
    redact,
)
from vdisk.errors import ImageError


def test_http_url_is_the_url() -> None:
    s = parse("http://images.example/golden/base.qcow2")
    assert (s.driver, s.url, s.display) == ("http", "http://images.example/golden/base.qcow2",
                                            "http://images.example/golden/base.qcow2")
    assert s.sslverify and s.readahead == READAHEAD_DEFAULT and s.format is None


def test_https_credentials_stay_in_url_but_not_in_display() -> None:
    s = parse("https://alice:s3cret@images.example:8443/base.img")
    assert s.driver == "https"
    assert s.url == "https://alice:s3cret@images.example:8443/base.img"
    assert s.display == "https://images.example:8443/base.img"


def test_nbd_tcp_default_port_and_export() -> None:
    s = parse("nbd://10.0.0.5/golden")
    assert (s.driver, s.host, s.port, s.export, s.socket_path) == (
        "nbd", "10.0.0.5", NBD_DEFAULT_PORT, "golden", None)
    s = parse("nbd+tcp://[::1]:10900")
    assert (s.host, s.port, s.export) == ("::1", 10900, "")
    assert s.display == "nbd://[::1]:10900/"


def test_nbd_export_keeps_a_second_slash_and_is_unquoted() -> None:
    # QEMU strips one slash only (since 5.0): nbd://h//abs names the export "/abs"
    assert parse("nbd://h//abs/path").export == "/abs/path"
    assert parse("nbd://h/my%20disk").export == "my disk"


def test_nbd_unix() -> None:
    s = parse("nbd+unix:///golden?socket=/run/nbd.sock")
    assert (s.socket_path, s.export, s.host, s.port) == ("/run/nbd.sock", "golden", None, None)
    s = parse("nbd+unix://?socket=/run/nbd.sock")
    assert (s.socket_path, s.export) == ("/run/nbd.sock", "")
    assert parse("nbd+unix:///?socket=/s").key != parse("nbd+unix:///x?socket=/s").key


@pytest.mark.parametrize(("name", "reason"), [
    ("ftp://h/x", "unknown scheme 'ftp'"),
    ("gopher://h/x", "unknown scheme"),
    ("http:/h/x", "not a URL"),
    ("http://", "names no host"),
    ("http://h:99999/x", "not a valid URL"),
    ("http://h:port/x", "not a valid URL"),
    ("nbd:///export", "names no host"),
    ("nbd://h/x?socket=/s", "no query parameters"),
    ("nbd://u:p@h/x", "no user name"),
    ("nbd+unix://h/x?socket=/s", "names no host"),
    ("nbd+unix:///x", "socket=PATH"),
    ("nbd+unix:///x?socket=/s&socket=/t", "exactly one"),
    ("nbd+unix:///x?sock=/s", "socket=PATH"),
])
def test_bad_urls_name_the_url_and_the_reason(name: str, reason: str) -> None:
    with pytest.raises(ImageError) as e:
        parse(name)
    assert reason in e.value.reason
    assert e.value.path == redact(name)


def test_errors_never_show_credentials() -> None:
    with pytest.raises(ImageError) as e:
        parse("http://bob:hunter2@h:99999/x")
    assert "hunter2" not in str(e.value) and "bob" not in str(e.value)


def test_redact() -> None:
    assert redact("https://u:p@h/x") == "https://h/x"
    assert redact("https://user@h/x?a=b@c") == "https://h/x?a=b@c"
    assert redact("http://h/x") == "http://h/x"
    j = 'json:{"file.driver":"http","file.url":"http://a:b@h/x","file.cookie":"sid=42"}'
    out = redact(j)
    assert "a:b@" not in out and "sid=42" not in out and "http://h/x" in out


def test_is_remote_name() -> None:
    for name in ("http://h/x", "https://h/x", "nbd://h/x", "nbd+tcp://h", "nbd+unix:///?socket=/s",
                 'json:{"file.driver": "http"}', 'json:{"driver": "nbd"}',
                 'json:{"driver": "qcow2", "file": {"filename": "https://h/x"}}'):
        assert is_remote_name(name), name
    for name in ("base.qcow2", "/srv/base.raw", "file:base.raw", "file:///x", "c:x",
                 "dir/http://x", "ftp://h/x", "ssh://h/x", "nbd:h:10809", "json:{}", "json:[",
                 'json:{"file": {"driver": "file", "filename": "x"}}'):
        assert not is_remote_name(name), name


def _json(doc: object) -> str:
    return "json:" + json.dumps(doc)


def test_json_nested_and_flattened_http_are_the_same() -> None:
    nested = parse(_json({"driver": "qcow2", "file": {
        "driver": "https", "url": "https://h/b.qcow2", "sslverify": "off", "timeout": 7,
        "readahead": "1M", "cookie": "sid=1"}}))
    flat = parse(_json({"driver": "qcow2", "file.driver": "https", "file.url": "https://h/b.qcow2",
                        "file.sslverify": False, "file.timeout": "7",
                        "file.readahead": 1 << 20, "file.cookie": "sid=1"}))
    assert nested == flat
    assert (flat.driver, flat.url, flat.format, flat.sslverify, flat.timeout, flat.readahead,
            flat.cookie) == ("https", "https://h/b.qcow2", "qcow2", False, 7.0, 1 << 20, "sid=1")


def test_json_filename_form() -> None:
    s = parse(_json({"file.filename": "http://h/b.raw"}))
    assert (s.driver, s.url, s.format) == ("http", "http://h/b.raw", None)


def test_json_nbd_server_forms() -> None:
    inet = parse(_json({"file": {"driver": "nbd", "export": "golden",
                                 "server": {"type": "inet", "host": "h", "port": "10900"}}}))
    assert (inet.host, inet.port, inet.export, inet.socket_path) == ("h", 10900, "golden", None)
    unix = parse(_json({"driver": "raw", "file.driver": "nbd", "file.server.type": "unix",
                        "file.server.path": "/run/s"}))
    assert (unix.socket_path, unix.export, unix.format) == ("/run/s", "", "raw")
    legacy = parse(_json({"file": {"driver": "nbd", "host": "h"}}))
    assert (legacy.host, legacy.port) == ("h", NBD_DEFAULT_PORT)
    legacy_unix = parse(_json({"file": {"driver": "nbd", "path": "/s", "export": "e"}}))
    assert (legacy_unix.socket_path, legacy_unix.export) == ("/s", "e")
    by_name = parse(_json({"file": {"driver": "nbd", "filename": "nbd://h:1/e"}}))
    assert (by_name.host, by_name.port, by_name.export) == ("h", 1, "e")


def test_json_protocol_at_the_top_reads_as_raw() -> None:
    s = parse(_json({"driver": "nbd", "server": {"type": "unix", "path": "/s"}}))
    assert (s.driver, s.socket_path, s.format) == ("nbd", "/s", "raw")


@pytest.mark.parametrize(("doc", "reason"), [
    ("json:{", "not valid JSON"),
    ("json:[1]", "must be a JSON object"),
    (_json({"driver": "qcow2", "file": {"driver": "file", "filename": "/x"}}),
     "protocol driver 'file' is not supported"),
    (_json({"driver": "vmdk", "file": {"driver": "http", "url": "http://h/x"}}),
     "format driver 'vmdk'"),
    (_json({"file": {"driver": "http"}}), "needs an 'url'"),
    (_json({"file": {"driver": "http", "url": "https://h/x"}}), "does not start with 'http://'"),
    (_json({"file": {"driver": "http", "url": "http://h/x", "bogus": 1}}), "unknown option 'bogus'"),
    (_json({"file": {"driver": "http", "url": "http://h/x", "readahead": 1000}}),
     "not a multiple of 512"),
    (_json({"file": {"driver": "http", "url": "http://h/x", "timeout": 10001}}), "out of range"),
    (_json({"file": {"driver": "http", "url": "http://h/x", "sslverify": "maybe"}}),
     "must be on or off"),
    (_json({"file": {"driver": "https", "url": "https://h/x", "password-secret": "s0"}}),
     "secret objects"),
    (_json({"file": {"driver": "nbd", "server": {"type": "inet", "host": "h"}, "tls-creds": "t"}}),
     "TLS"),
    (_json({"file": {"driver": "nbd"}}), "server address missing"),
    (_json({"file": {"driver": "nbd", "server": {"type": "vsock", "cid": "3"}}}), "vsock"),
    (_json({"file": {"driver": "nbd", "host": "h", "server": {"type": "unix", "path": "/s"}}}),
     "at the same time"),
    (_json({"file": {"driver": "nbd", "path": "/s", "host": "h"}}), "at the same time"),
    (_json({"driver": "qcow2", "backing": None, "file": {"driver": "http", "url": "http://h/"}}),
     "option 'backing'"),
])
def test_bad_json_names(doc: str, reason: str) -> None:
    with pytest.raises(ImageError) as e:
        parse(doc)
    assert reason in e.value.reason
