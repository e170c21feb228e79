"""The fleet across machines that share nothing but the network (issue #16).

Five hosts in network namespaces (see conftest.py): services, three workers, a client. One fleet
serves the module; tests that power a host off or change its clock bring it back before they end.
"""

from __future__ import annotations

import ipaddress
import re
import time
from typing import Any

import pytest

from obdconv.pipeline.prepare import spool_key
from tests.multihost.conftest import HOSTS, WORKERS, MultiHostFleet, node, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.services, pytest.mark.timeout(900)]

BENCHMARKING = ipaddress.ip_network("198.18.0.0/15")
SPOOL = "/var/tmp/obdconv/spool"  # the settings' default: the same path on every host, private to each
BOTH = ("--overlaybd", "obd", "--turboOCI", "turbo")
REFERENCE = ("--overlaybd", "ref-obd", "--turboOCI", "ref-turbo")


def reference_of(fleet: MultiHostFleet, repo: str, seed: int, layers: int, **kw: Any) -> dict[str, str]:
    """The one-machine conversion (`obdconv convert` on the client host, no fleet, no database) of
    the same image, pushed to a repository of its own: format -> manifest digest."""
    fleet.push_image(f"{repo}-ref", "src", layers=layers, seed=seed, **kw)
    result = fleet.convert_locally(f"{repo}-ref", "src", *REFERENCE)
    return {out["format"]: out["root_digest"] for out in result["outputs"]}


def digests(final: dict[str, Any]) -> dict[str, str]:
    assert final["state"] == "SUCCESS", final
    return {fmt: out["digest"] for fmt, out in final["outputs"].items()}


def assert_converted_once(fleet: MultiHostFleet, repo: str, request_ids: list[str], layers: int,
                          outputs: dict[str, str]) -> None:
    """What the dedup database recorded is exactly what was pushed: per format one row per layer
    chain, holding the digest the pushed manifest lists, and one manifest row holding the output
    digest; every claim the requests took is released; the manifests list each layer once."""
    recorded: dict[str, dict[str, str]] = {}
    for profile, chain_id, digest in fleet.sql(
            f"SELECT profile, chain_id, data_digest FROM obdconv_layers WHERE repo = '{repo}'"):
        recorded.setdefault(profile, {})[chain_id] = digest
    pushed = []
    for tag in ("obd", "turbo"):
        listed = [layer["digest"] for layer in fleet.manifest(repo, tag)["layers"]]
        assert len(listed) == layers and len(set(listed)) == layers, listed
        pushed.append(sorted(listed))
    assert sorted(sorted(chains.values()) for chains in recorded.values()) == sorted(pushed), (recorded, pushed)
    manifests = fleet.sql(f"SELECT out_digest FROM obdconv_manifests WHERE repo = '{repo}'")
    assert sorted(row[0] for row in manifests) == sorted(outputs.values()), (manifests, outputs)
    for request_id in request_ids:
        assert fleet.sql(f"SELECT `key`, owner FROM obdconv_claims WHERE owner LIKE 'fleet:{request_id}:%'") == []


def layer_digests(fleet: MultiHostFleet, repo: str) -> list[str]:
    return [layer["digest"] for layer in fleet.manifest(repo, "src")["layers"]]


def test_hosts_share_nothing_but_the_network(fleet: MultiHostFleet) -> None:
    for name in HOSTS:
        addresses = re.findall(r"\binet6? ([0-9a-f.:]+)/\d+", fleet.net.addresses(name))
        v4 = [a for a in addresses if ":" not in a]
        assert v4 and all(ipaddress.ip_address(a) in BENCHMARKING for a in v4 if a != "127.0.0.1"), addresses
        assert "default" not in fleet.net.routes(name)
        assert fleet.host(name).run(["hostname"]).stdout.decode().strip() == name
    # Disks: what one host writes at a path, no other host has there; /work is read-only.
    fleet.host("w1").write_file(f"{SPOOL}/probe-w1", b"written on w1")
    assert fleet.host("w1").exists(f"{SPOOL}/probe-w1")
    for other in ("w2", "w3", "cli", "svc"):
        assert not fleet.host(other).exists(f"{SPOOL}/probe-w1"), other
    assert fleet.host("w2").run(["touch", "/work/probe"], check=False).returncode != 0
    # "localhost" on a worker host reaches nothing (its loopback is down): a URL naming it fails at once.
    refused = fleet.host("w1").run(["redis-cli", "-h", "127.0.0.1", "-p", str(fleet.redis.port), "PING"], check=False)
    assert b"PONG" not in refused.stdout
    # ...while the services are reachable from every host through the network.
    for name in (*WORKERS, "cli"):
        out = fleet.host(name).run(["redis-cli", "-h", fleet.redis.host, "-p", str(fleet.redis.port), "PING"])
        assert out.stdout.strip() == b"PONG", name


def test_converts_across_hosts_like_one_machine(fleet: MultiHostFleet) -> None:
    fleet.push_image("mh/six", "src", layers=6, seed=61)
    request_id = fleet.submit("mh/six", "src", *BOTH)
    outputs = digests(fleet.wait(request_id))
    assert outputs == reference_of(fleet, "mh/six", 61, 6)

    prepared, assembled, reprepared = fleet.where_ran(request_id)
    layers = layer_digests(fleet, "mh/six")
    assert set(prepared) == set(layers), prepared
    assert all(len(hosts) == 1 for hosts in prepared.values()), prepared  # each layer prepared once
    assert len(set().union(*prepared.values())) >= 2, prepared  # on at least two hosts
    assert assembled == prepared and not reprepared  # each assemble where its layer was prepared
    assert {d: n for d, n in fleet.runs("prepare").items() if d in layers} == dict.fromkeys(layers, 1)

    # The prepared data is on the preparing host's disk only, at a path the others do not have.
    for layer, (host,) in ((d, tuple(h)) for d, h in prepared.items()):
        path = f"{SPOOL}/{node(host)}/{spool_key(layer, 'lz4', 4096)}/prepared.json"
        assert fleet.host(host).exists(path), path
        assert not any(fleet.host(other).exists(path) for other in WORKERS if other != host), path
    assert_converted_once(fleet, "mh/six", [request_id], 6, outputs)


def test_a_host_powered_off_mid_request(fleet: MultiHostFleet) -> None:
    fleet.push_image("mh/kill", "src", layers=8, seed=71, file_bytes=256 << 10)
    expected = reference_of(fleet, "mh/kill", 71, 8, file_bytes=256 << 10)
    layers = layer_digests(fleet, "mh/kill")
    request_id = fleet.submit("mh/kill", "src", *BOTH)

    def a_finished_preparer() -> str | None:
        return next((h for h in WORKERS if fleet.prepares_finished(h) & set(layers)), None)

    # Power off the first host to FINISH preparing a layer: that prepared data exists only on its
    # disk, so wherever the layer is assembled now, it has to be prepared again there.
    victim = wait_until(a_finished_preparer, 120, "a host to finish preparing a layer", interval=0.05)
    fleet.kill_host(victim)
    try:
        lost = fleet.prepares_finished(victim) & set(layers)
        outputs = digests(fleet.wait(request_id, timeout=240))
        assert outputs == expected
        prepared, assembled, reprepared = fleet.where_ran(request_id)
        assert set(assembled) == set(layers), assembled
        for layer, hosts in assembled.items():
            assert len(hosts) == 1 and victim not in hosts, (layer, hosts)
            # ...where it was prepared, or prepared again there after the victim's spool died
            assert hosts <= prepared.get(layer, set()) or layer in reprepared, (layer, hosts, prepared)
        assert lost <= reprepared, (lost, reprepared)
        assert_converted_once(fleet, "mh/kill", [request_id], 8, outputs)
    finally:
        fleet.start_worker(victim)  # the host boots again, with empty disks


def test_an_oci_layout_on_another_host_fails_loudly(fleet: MultiHostFleet) -> None:
    """A path is only meaningful on the machine it was written on: a request naming a layout that
    only the client host has fails with an error that says so, instead of converting something else."""
    fleet.client("-c", "from workers.sample_image import build_sample_image; "
                       "build_sample_image('/tmp/client-only', 'src', layers=1)")
    out = fleet.client("-m", "obdconv", "submit", "-r", "oci:/tmp/client-only", "-i", "src", "--overlaybd", "obd")
    final = fleet.wait(out.stdout.decode().strip().splitlines()[-1], timeout=90)
    assert final["state"] == "FAILURE", final
    assert final["error"]["class"] == "NotFoundError", final
    message = final["error"]["message"]
    assert "/tmp/client-only" in message and "obdconv@w" in message, message
    assert "every worker" in message, message


def test_an_oci_output_layout_that_is_not_shared_is_refused(fleet: MultiHostFleet) -> None:
    """Every worker host has a directory at the output path, but each its own: the layers land on
    the hosts that assembled them, so the push (on one host) must not write a manifest whose
    blobs its layout lacks. It fails, saying where and why, instead of "succeeding" with a
    layout no one can read."""
    fleet.push_image("mh/to-layout", "src", layers=6, seed=101)
    out = fleet.client("-m", "obdconv", "submit", "-r", f"{fleet.registry.host}/mh/to-layout", "-i", "src",
                       "--plain", "--overlaybd", "obd", "--output-repository", "oci:/var/tmp/out")
    request_id = out.stdout.decode().strip().splitlines()[-1]
    final = fleet.wait(request_id, timeout=120)
    _, assembled, _ = fleet.where_ran(request_id)
    assert len(set().union(*assembled.values())) >= 2, assembled  # the blobs are on several hosts
    assert final["state"] == "FAILURE", final
    assert final["error"]["class"] == "NotFoundError", final
    message = final["error"]["message"]
    assert "not in the layout /var/tmp/out" in message and "every worker" in message, message


def test_a_loopback_registry_is_refused_at_submit(fleet: MultiHostFleet) -> None:
    """`localhost` means a different machine on every worker: the client refuses to hand it over."""
    for repository in ("localhost:5000/app", "127.0.0.1:5000/app", "[::1]:5000/app"):
        out = fleet.client("-m", "obdconv", "submit", "-r", repository, "-i", "v1", "--overlaybd", "obd",
                           check=False)
        assert out.returncode == 64, (repository, out.stdout, out.stderr)  # UsageError
        assert b"each worker" in out.stderr, out.stderr


def test_worker_clocks_two_minutes_off(fleet: MultiHostFleet) -> None:
    """w3's clock 2 minutes behind, w2's 2 minutes ahead (libfaketime): leases (the broker's
    redelivery of a dead worker's messages), the message ledger, retry delays and claims all keep
    one clock, so nothing is taken from a live worker, nothing waits 2 minutes, nothing runs twice."""
    try:
        for name, offset in (("w3", "-120"), ("w2", "+120")):
            fleet.stop_worker(name)
            fleet.start_worker(name, clock_offset=offset)
            # The worker's own log stamps its "ready" line with its (faked) clock.
            ready = re.findall(r"^(\S+ \S+),\d+ INFO celery.apps.worker: obdconv@\w+ ready", fleet.log(name), re.M)
            skew = time.mktime(time.strptime(ready[-1], "%Y-%m-%d %H:%M:%S")) - time.time()
            assert abs(skew - int(offset)) < 10, (name, skew)
        # Two images on the same four base layers, at once: the second waits for the first's
        # claims (retries with a delay) and then converts only its own top layers.
        for n in (1, 2):
            fleet.push_image(f"mh/skew{n}", "src", layers=6, seed=80 + n, shared_layers=4)
        before = fleet.runs("prepare")
        started = time.monotonic()
        request_ids = [fleet.submit(f"mh/skew{n}", "src", *BOTH) for n in (1, 2)]
        finals = [fleet.wait(r, timeout=150) for r in request_ids]
        elapsed = time.monotonic() - started
        assert [f["state"] for f in finals] == ["SUCCESS", "SUCCESS"], finals
        assert elapsed < 100, elapsed  # no retry waited the 2 minutes of skew
        ran_on = set()
        for request_id in request_ids:
            prepared, assembled, _ = fleet.where_ran(request_id)
            ran_on |= set().union(*prepared.values(), *assembled.values())
            assert all(len(hosts) == 1 for hosts in (*prepared.values(), *assembled.values())), (prepared, assembled)
        assert {"w2", "w3"} & ran_on, ran_on  # the skewed hosts took part
        after = fleet.runs("prepare")
        layers = set(layer_digests(fleet, "mh/skew1")) | set(layer_digests(fleet, "mh/skew2"))
        assert {d: after[d] - before.get(d, 0) for d in layers} == dict.fromkeys(layers, 1)  # 8 layers, once each
        for n, (request_id, final) in enumerate(zip(request_ids, finals, strict=True), start=1):
            assert_converted_once(fleet, f"mh/skew{n}", [request_id], 6, digests(final))
        assert "re-sending it" not in "".join(fleet.logs().values())  # the ledger lost nothing
    finally:
        for name in ("w2", "w3"):  # back on time for the tests after this one
            fleet.stop_worker(name)
            fleet.start_worker(name)


def test_a_worker_host_cut_off_for_20_seconds(fleet: MultiHostFleet) -> None:
    """The network of a busy worker host goes away for 20 s (longer than the 18 s lease) and comes
    back: its held messages are redelivered to the others as documented, the request completes with
    the one-machine result, nothing is recorded or claimed twice, and the host works again after."""
    fleet.push_image("mh/cut", "src", layers=8, seed=91, file_bytes=256 << 10)
    expected = reference_of(fleet, "mh/cut", 91, 8, file_bytes=256 << 10)
    request_id = fleet.submit("mh/cut", "src", *BOTH)

    def first_preparer() -> str | None:
        prepared, _, _ = fleet.where_ran(request_id)
        return next((h for hosts in prepared.values() for h in sorted(hosts)), None)

    victim = wait_until(first_preparer, 120, "a host to prepare a layer of the request", interval=0.05)
    fleet.host(victim).link(up=False)
    try:
        time.sleep(20)
    finally:
        fleet.host(victim).link(up=True)
    outputs = digests(fleet.wait(request_id, timeout=240))
    assert outputs == expected
    assert_converted_once(fleet, "mh/cut", [request_id], 8, outputs)
    # The host is back in the fleet: its liveness key returns and it takes work again.
    wait_until(lambda: fleet.worker_alive_key_set(victim), 60, f"{victim} to be alive again")
    fleet.push_image("mh/after-cut", "src", layers=6, seed=95)
    again = fleet.submit("mh/after-cut", "src", "--overlaybd", "obd")
    assert fleet.wait(again)["state"] == "SUCCESS"
