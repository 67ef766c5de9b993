"""protocol._bundle: canonical manifests, Ed25519 signatures, every refusal reason, bounds."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import _bundle as b

NOW = 1_800_000_000_000
MOD = b"\0asm\1\0\0\0 a module"


def manifest(**over: object) -> b.Manifest:
    key = over.pop("key", None)
    text = str(over.pop("text", "version: 1\nchain: []\n"))
    fields: dict = dict(
        fleet="acme",
        version=3,
        priority="normal",
        not_before=NOW - 1000,
        not_after=NOW + 86_400_000,
        created=NOW - 2000,
        key_id=key.id if key else "ed" + "0" * 16,
        filters_text=text,
        filters_sha256=hashlib.sha256(text.encode()).hexdigest(),
        modules=(b.ModuleEntry("lib/a.wasm", hashlib.sha256(MOD).hexdigest(), len(MOD)),),
    )
    fields.update(over)
    return b.Manifest(**fields)


@pytest.fixture(scope="module")
def key() -> b.SigningKey:
    return b.SigningKey.generate()


def signed(key: b.SigningKey, **over: object) -> tuple[bytes, bytes]:
    data = b.encode_manifest(manifest(key=key, **over))
    return data, key.sign(data)


def refusal(data: bytes, sig: bytes, kid: str, **kw: object) -> str:
    with pytest.raises(b.BundleRefused) as e:
        b.verify(data, sig, kid, **kw)  # type: ignore[arg-type]
    assert e.value.detail and e.value.reason in b.REASONS
    return e.value.reason


def test_round_trip_through_the_envelope(key: b.SigningKey) -> None:
    data, sig = signed(key)
    env = json.loads(json.dumps(b.envelope(data, sig, key.id)))
    data2, sig2, kid = b.open_envelope(env)
    m = b.verify(data2, sig2, kid, trusted={key.id: key.public}, now_ms=NOW, applied_version=2)
    assert m == manifest(key=key)
    assert m.total_bytes == len(MOD)
    b.check_module(m.modules[0], MOD)
    # canonical: sorted keys, compact, ascii
    assert data == json.dumps(json.loads(data), sort_keys=True, separators=(",", ":")).encode()


def test_key_ids_are_derived_and_key_lines_checked(key: b.SigningKey) -> None:
    line = key.public.line
    assert b.PublicKey.parse(line) == key.public
    assert b.PublicKey.parse(line.split()[1]) == key.public
    other = b.SigningKey.generate()
    assert other.id != key.id and key.id.startswith("ed") and len(key.id) == 18
    with pytest.raises(ValueError, match="not this key's id"):
        b.PublicKey.parse(f"{other.id} {line.split()[1]}")
    with pytest.raises(ValueError, match="32 bytes"):
        b.PublicKey.parse("AAAA")
    assert b.parse_public_keys([line, other.public.line]).keys() == {key.id, other.id}
    keys = b.SigningKey.parse_lines(f"{key.line}\n# comment\n{other.line}\n", "f")
    assert [k.id for k in keys] == [key.id, other.id]
    assert "AAAA" not in repr(key) and key.line.split()[1] not in repr(key)
    with pytest.raises(ValueError, match="line 1"):
        b.SigningKey.parse_lines(f"{other.id} {key.line.split()[1]}", "f")


def test_every_refusal_reason(key: b.SigningKey) -> None:
    trusted = {key.id: key.public}
    data, sig = signed(key)
    kw = dict(trusted=trusted, now_ms=NOW)
    # signature: a changed byte of the manifest, a wrong signature, another key
    tampered = data.replace(b'"version":3', b'"version":9')
    assert refusal(tampered, sig, key.id, **kw) == "bad_signature"
    assert refusal(data, bytes(64), key.id, **kw) == "bad_signature"
    assert refusal(data, sig[:10], key.id, **kw) == "bad_signature"
    stranger = b.SigningKey.generate()
    assert refusal(*signed(stranger), stranger.id, **kw) == "unknown_key"
    # a retired key is refused even when it is also listed as trusted
    kw_r = dict(trusted=trusted, retired={key.id: key.public}, now_ms=NOW)
    assert refusal(data, sig, key.id, **kw_r) == "retired_key"
    # window and version
    assert refusal(data, sig, key.id, trusted=trusted, now_ms=NOW + 86_400_000) == "expired"
    assert refusal(data, sig, key.id, trusted=trusted, now_ms=NOW - 1001) == "not_yet_valid"
    assert refusal(data, sig, key.id, applied_version=3, **kw) == "downgrade"
    assert refusal(data, sig, key.id, applied_version=7, **kw) == "downgrade"
    assert refusal(data, sig, key.id, fleet="other", **kw) == "malformed"
    # the key the envelope names must be the manifest's
    other_kid = manifest(key=stranger)
    d2 = b.encode_manifest(other_kid)
    assert refusal(d2, key.sign(d2), key.id, **kw) == "malformed"
    # too large before anything else is looked at
    assert refusal(b" " * (b.MAX_MANIFEST_BYTES + 1), sig, key.id, **kw) == "too_large"
    # module bytes
    entry = manifest(key=key).modules[0]
    for bad, reason in ((MOD + b"x", "too_large"), (MOD[:-1], "hash_mismatch")):
        with pytest.raises(b.BundleRefused) as e:
            b.check_module(entry, bad, version=3)
        assert e.value.reason == reason and e.value.version == 3
    with pytest.raises(b.BundleRefused, match="hash_mismatch"):
        b.check_module(entry, MOD[:-1] + b"!")


def _signed_obj(key: b.SigningKey, mutate) -> tuple[bytes, bytes]:  # type: ignore[no-untyped-def]
    obj = manifest(key=key).to_obj()
    mutate(obj)
    data = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
    return data, key.sign(data)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda o: o.update(format=2),
        lambda o: o.update(extra=1),
        lambda o: o.pop("fleet"),
        lambda o: o.update(version=0),
        lambda o: o.update(version=1.5),
        lambda o: o.update(version=True),
        lambda o: o.update(priority="whenever"),
        lambda o: o.update(not_after=o["not_before"]),
        lambda o: o["filters"].update(sha256="0" * 64),
        lambda o: o["filters"].update(text="x" * (b.MAX_FILTERS_BYTES + 1)),
        lambda o: o["modules"][0].update(path="../../etc/passwd.wasm"),
        lambda o: o["modules"][0].update(path="/abs/a.wasm"),
        lambda o: o["modules"][0].update(path="lib/.hidden.wasm"),
        lambda o: o["modules"][0].update(path="lib/a.so"),
        lambda o: o["modules"][0].update(path="lib\\a.wasm"),
        lambda o: o["modules"][0].update(sha256="A" * 64),
        lambda o: o["modules"][0].update(size=b.MAX_MODULE_BYTES + 1),
        lambda o: o["modules"].append(dict(o["modules"][0])),  # a path twice
        lambda o: o.update(modules=[dict(o["modules"][0], path=f"m{i}.wasm") for i in range(40)]),
    ],
)
def test_malformed_manifests_are_refused_even_when_signed(key: b.SigningKey, mutate) -> None:  # type: ignore[no-untyped-def]
    data, sig = _signed_obj(key, mutate)
    assert refusal(data, sig, key.id, trusted={key.id: key.public}, now_ms=NOW) == "malformed"


def test_non_canonical_bytes_are_refused(key: b.SigningKey) -> None:
    data = json.dumps(manifest(key=key).to_obj(), sort_keys=True, indent=1).encode()
    reason = refusal(data, key.sign(data), key.id, trusted={key.id: key.public}, now_ms=NOW)
    assert reason == "malformed"


def test_encode_refuses_what_a_device_would_refuse(key: b.SigningKey) -> None:
    with pytest.raises(ValueError, match=r"\.\."):
        b.encode_manifest(manifest(key=key, modules=(b.ModuleEntry("../x.wasm", "0" * 64, 1),)))


@pytest.mark.parametrize(
    "env",
    [
        None,
        {},
        {"manifest": 1, "signature": "", "key_id": ""},
        {"manifest": "!!", "signature": "AA", "key_id": "ed"},
        {"manifest": "AA", "signature": "A" * 200, "key_id": "ed"},
    ],
)
def test_bad_envelopes(env: object) -> None:
    with pytest.raises(b.BundleRefused, match="malformed"):
        b.open_envelope(env)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=600), st.integers(0, 599))
def test_any_byte_flip_is_refused(tail: bytes, pos: int) -> None:
    key = _KEY
    data, sig = signed(key)
    i = pos % len(data)
    flipped = data[:i] + bytes([data[i] ^ 0x01]) + data[i + 1 :]
    with pytest.raises(b.BundleRefused):
        b.verify(flipped, sig, key.id, trusted={key.id: key.public}, now_ms=NOW)
    with pytest.raises(b.BundleRefused):
        b.verify(
            data + tail[:1] if tail else data + b" ",
            sig,
            key.id,
            trusted={key.id: key.public},
            now_ms=NOW,
        )


_KEY = b.SigningKey.generate()


def local_manifest(key: b.SigningKey, **over: object) -> b.Manifest:
    """:func:`manifest`'s fields, as a local bundle (no filters, no modules)."""
    m = manifest(key=key, version=5, priority="urgent", **over)
    return dataclasses.replace(m, filters_text="", filters_sha256="", modules=(), chain="local")


def test_a_local_bundle_has_chain_local_and_no_filters_or_modules(key: b.SigningKey) -> None:
    data = b.encode_manifest(local_manifest(key))
    obj = json.loads(data)
    assert obj["chain"] == "local" and "filters" not in obj and "modules" not in obj
    assert set(obj) == {"format", "fleet", "version", "priority", "not_before", "not_after",
                        "created", "key_id", "chain"}  # fmt: skip
    assert data == json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
    sig = key.sign(data)
    data2, sig2, kid = b.open_envelope(json.loads(json.dumps(b.envelope(data, sig, key.id))))
    m = b.verify(data2, sig2, kid, trusted={key.id: key.public}, now_ms=NOW, applied_version=4)
    assert m.is_local and m == local_manifest(key) and m.total_bytes == 0 and not m.modules
    assert b.decode_manifest(data) == m
    assert not manifest(key=key).is_local
    # non-canonical bytes of the same manifest are refused, as for any bundle
    loose = json.dumps(obj, sort_keys=True, indent=1).encode()
    assert refusal(loose, key.sign(loose), key.id, trusted={key.id: key.public}, now_ms=NOW) == (
        "malformed"
    )


def test_a_local_bundle_is_verified_like_any_other(key: b.SigningKey) -> None:
    data = b.encode_manifest(local_manifest(key))
    sig = key.sign(data)
    trusted = {key.id: key.public}
    other = b.SigningKey.generate()
    assert refusal(data, other.sign(data), key.id, trusted=trusted, now_ms=NOW) == "bad_signature"
    assert refusal(data, sig, key.id, trusted={}, now_ms=NOW) == "unknown_key"
    assert refusal(data, sig, key.id, trusted=trusted, retired=[key.id], now_ms=NOW) == (
        "retired_key"
    )
    assert refusal(data, sig, key.id, trusted=trusted, now_ms=NOW, fleet="other") == "malformed"
    assert refusal(data, sig, key.id, trusted=trusted, now_ms=NOW - 5000) == "not_yet_valid"
    assert refusal(data, sig, key.id, trusted=trusted, now_ms=NOW + 86_400_000) == "expired"
    assert refusal(data, sig, key.id, trusted=trusted, now_ms=NOW, applied_version=5) == (
        "downgrade"
    )


@pytest.mark.parametrize(
    "mutate",
    [
        lambda o: o.update(chain="bundle"),
        lambda o: o.update(chain="LOCAL"),
        lambda o: o.update(chain=None),
        lambda o: o.update(filters={"sha256": hashlib.sha256(b"").hexdigest(), "text": ""}),
        lambda o: o.update(modules=[]),
        lambda o: o.pop("key_id"),
        lambda o: o.update(extra=1),
    ],
)
def test_malformed_local_manifests_are_refused(key: b.SigningKey, mutate) -> None:  # type: ignore[no-untyped-def]
    obj = local_manifest(key).to_obj()
    mutate(obj)
    data = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
    assert refusal(data, key.sign(data), key.id, trusted={key.id: key.public}, now_ms=NOW) == (
        "malformed"
    )


def test_encode_refuses_a_local_bundle_with_a_chain(key: b.SigningKey) -> None:
    with pytest.raises(ValueError, match="no filters"):
        b.encode_manifest(manifest(key=key, chain="local"))
    with pytest.raises(ValueError, match="chain must be"):
        b.encode_manifest(manifest(key=key, chain="remote"))


def test_manifest_local_is_the_local_form_of_a_manifest(key: b.SigningKey) -> None:
    m = local_manifest(key)
    made = b.Manifest.local(fleet=m.fleet, version=m.version, priority=m.priority,
                            not_before=m.not_before, not_after=m.not_after, created=m.created,
                            key_id=m.key_id)  # fmt: skip
    assert made == m and made.is_local
