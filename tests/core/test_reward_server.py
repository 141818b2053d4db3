"""Rewards behind an HTTP server: the wire format, remote == local, batching, retries, health, training."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch

from flowcoach.core.registry import REWARDS, FlowcoachError
from flowcoach.rewards import build_reward, parse_reward_spec
from flowcoach.rewards.server import (RemoteReward, RemoteRewardError, RewardBatcher, RewardServer, ServerStats,
                                      WireError, _Handler, decode, encode, parse_remote, split_weight)


@pytest.fixture
def server():
    srv = RewardServer(port=0).start()
    yield srv
    srv.stop()


@pytest.fixture
def registered():
    """Register test rewards under unique names; unregistered afterwards."""
    names = []

    def register(name, fn):
        REWARDS.register(name, fn)
        names.append(name)
        return name

    yield register
    for name in names:
        REWARDS.unregister(name)


def toy_batch(n=16, seed=0):
    g = np.random.default_rng(seed)
    return [g.normal(size=2).astype(np.float32) * 2 for _ in range(n)], torch.arange(n) % 8


def same(a, b) -> bool:
    """Deep equality of decoded values (tensors/arrays by value and dtype, NaN equal to NaN)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(
            torch.nan_to_num(a.float(), nan=7.0), torch.nan_to_num(b.float(), nan=7.0))
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b, equal_nan=a.dtype.kind == "f")
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if dataclasses.is_dataclass(a):
        return type(a) is type(b) and all(same(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a))
    return type(a) is type(b) and a == b


# ----------------------------------------------------------------------------- wire format
def test_wire_round_trip_keeps_values_dtypes_and_shapes():
    from flowcoach.core.interact import EpisodeSettings

    value = {
        "f32": torch.randn(3, 2), "bf16": torch.tensor([1.5, -2.0], dtype=torch.bfloat16),
        "bool": torch.tensor([[True, False]]), "long": torch.arange(5), "empty": torch.zeros(0, 3),
        "scalar_tensor": torch.tensor(3.25), "strided": torch.arange(12.0).reshape(3, 4).t(),
        "u8": np.arange(24, dtype=np.uint8).reshape(2, 3, 4), "f64": np.array([np.nan, np.inf, 1.0]),
        "np_scalar": np.float32(1.5), "np_bool": np.bool_(True), "objarray": np.array([None, "a", 2], dtype=object),
        "tuple": (1, 2.5, None, "s", True), "bytes": b"\x00\x01", 3: "int key", "__dunder": [1, [2, {"x": None}]],
        "nan": float("nan"), "inf": float("-inf"),
        "dataclass": EpisodeSettings(law="flow-sde", noise_level=0.5, stochastic_mask=torch.tensor([True, False])),
    }
    back = decode(encode(value))
    assert same(value, back)
    assert isinstance(back["np_scalar"], np.float32) and back["strided"].is_contiguous()
    back["u8"][0, 0, 0] = 99  # decoded arrays own their memory (writable, not views of the payload)
    back["f32"][0, 0] = 99.0


@dataclasses.dataclass
class Untrusted:
    x: int = 0


def forged(body) -> bytes:
    header = json.dumps({"version": "flowcoach-wire/1", "body": body, "sizes": []}).encode()
    return struct.pack("<Q", len(header)) + header


def test_wire_refuses_what_it_does_not_trust():
    with pytest.raises(WireError, match="only dataclasses of flowcoach"):
        encode(Untrusted())
    with pytest.raises(WireError, match="cannot send a builtins:set"):
        encode({1, 2})
    with pytest.raises(WireError, match="dataclasses must come from flowcoach"):
        decode(forged({"__dataclass__": "os:system", "fields": {}}))
    with pytest.raises(WireError, match="not a dataclass"):
        decode(forged({"__dataclass__": "flowcoach.core.registry:Registry", "fields": {}}))
    with pytest.raises(WireError, match="pymatgen objects must come from pymatgen.core"):
        decode(forged({"__pymatgen__": "subprocess:Popen", "data": {}}))
    with pytest.raises(WireError, match="out of range"):
        decode(forged({"__bytes__": 3}))
    with pytest.raises(WireError):
        decode(forged({"__ndarray__": 0, "dtype": "O", "shape": [1]}))
    for junk in (b"", b"\x05\x00\x00\x00\x00\x00\x00\x00abc", struct.pack("<Q", 2) + b"{}", b"\xff" * 16):
        with pytest.raises(WireError):
            decode(junk)


def test_wire_carries_dataclasses_of_modules_named_in_the_environment(monkeypatch):
    monkeypatch.setenv("FLOWCOACH_WIRE_MODULES", __name__.split(".")[0] + ".")
    assert same(decode(encode([Untrusted(4)])), [Untrusted(4)])


# ----------------------------------------------------------------------------- spec parsing
def test_url_rewards_in_the_reward_spec():
    assert split_weight("http://h:1/toy-mode=0.5") == ("http://h:1/toy-mode", "0.5")
    assert split_weight("http://h:1/toy-mode") == ("http://h:1/toy-mode", "")
    assert split_weight("http://h:1/r?timeout=5&retries=2=2") == ("http://h:1/r?timeout=5&retries=2", "2")
    assert split_weight("http://h:1/r?timeout=5&retries=2") == ("http://h:1/r?timeout=5&retries=2", "")
    assert parse_reward_spec(["toy-mode=1", "http://h:1/r?timeout=5=0.25"]) == {"toy-mode": 1.0, "http://h:1/r?timeout=5": 0.25}
    base, route, opts = parse_remote("http://10.0.0.2:8000/mol-qed?timeout=30&retries=5&backoff=0&health=false")
    assert (base, route, opts.timeout, opts.retries, opts.backoff, opts.health) == ("http://10.0.0.2:8000", "mol-qed", 30.0, 5, 0.0, False)
    for bad, message in [("http://h:1/", "names no reward"), ("http://h:1/r?speed=2", "unknown option 'speed'"),
                         ("http://h:1/r?timeout=soon", "not a float"), ("http://h:1/r?retries=-1", "retries and backoff >= 0"),
                         ("ftp://h/r", "not a reward URL")]:
        with pytest.raises(FlowcoachError, match=message):
            parse_remote(bad)


# ----------------------------------------------------------------------------- remote == local
def test_remote_scores_equal_local_scores(server):
    objects, cond = toy_batch()
    for name in ("toy-mode", "toy-on-manifold"):
        remote_scores, remote_info = RemoteReward(f"{server.url}/{name}")(objects, cond)
        local_scores, local_info = REWARDS.get(name)(objects, cond)
        assert torch.equal(remote_scores, local_scores.float())
        assert remote_info == {**local_info, "server_batch": len(objects)}
    remote = build_reward([f"{server.url}/toy-mode=0.5", f"{server.url}/toy_on_manifold=2"])
    local = build_reward(["toy-mode=0.5", "toy-on-manifold=2"])
    (rs, ri), (ls, li) = remote(objects, cond), local(objects, cond)
    assert torch.equal(rs, ls) and torch.equal(ri["components"], li["components"])


def molecules_batch():
    pytest.importorskip("rdkit")
    from flowcoach.domains.molecules.decode import decode as decode_molecules, from_smiles

    noise = decode_molecules(torch.randn(2, 29, 8, generator=torch.Generator().manual_seed(0)))
    objects = [from_smiles(s) for s in ("CCO", "CCO", "c1ccccc1O", "CC(=O)Nc1ccc(O)cc1")] + noise
    return objects, torch.tensor([[9, 3], [9, 3], [13, 7], [20, 11], [5, 2], [5, 2]]), \
        ["mol-valid", "mol-atom-stability", "mol-stability", "mol-qed", "mol-sa", "mol-duplicate"]


def crystals_batch():
    pytest.importorskip("pymatgen")
    pytest.importorskip("smact")
    from pymatgen.core import Lattice, Structure

    nacl = Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.64), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    si = Structure(Lattice.cubic(5.43), ["Si", "Si"], [[0, 0, 0], [0.25, 0.25, 0.25]])
    cramped = Structure(Lattice.cubic(1.0), ["Fe", "O"], [[0, 0, 0], [0.1, 0.1, 0.1]])
    return [nacl, si, cramped, None], None, ["crystal-structure", "crystal-smact", "crystal-valid", "crystal-volume"]


def video_batch():
    pytest.importorskip("cv2")
    from flowcoach.domains.video import decode_clips, make_data

    pixels, cond = make_data(3, seed=1)
    clips = decode_clips(pixels)
    clips[2] = np.zeros_like(clips[2])
    return clips, cond, ["video-physics", "video-persistence", "video-flicker", "video-warp"]


def speech_batch():
    pytest.importorskip("soundfile")
    from flowcoach.domains.speech.decode import utterance_of

    t = torch.arange(8000) / 16000
    waves = [0.3 * torch.sin(2 * math.pi * 180 * t), 1.5 * torch.sin(2 * math.pi * 120 * t), torch.zeros(4000)]
    return [utterance_of(w, 40) for w in waves], None, ["speech-clipping"]


def grasping_batch():
    episodes = [{"seed": k, "return": float(k) - 1.5, "success": k % 2 == 0, "steps": 10 + k,
                 "steps_to_success": None if k % 2 else 5, "frames": [np.zeros((4, 4, 3), np.uint8)]} for k in range(4)]
    return episodes, torch.arange(4), ["episode-return", "episode-success", "episode-speed"]


@pytest.mark.parametrize("make", [molecules_batch, crystals_batch, video_batch, speech_batch, grasping_batch],
                         ids=["molecules", "crystals", "video", "speech", "grasping"])
def test_remote_equals_local_on_each_domains_objects(server, make):
    objects, cond, names = make()
    assert same(decode(encode(objects)), objects) or make is molecules_batch  # RDKit Mol has no __eq__
    for name in names:
        remote_scores, remote_info = RemoteReward(f"{server.url}/{name}")(objects, cond)
        local_scores, local_info = REWARDS.get(name)(objects, cond)
        assert torch.equal(remote_scores, torch.as_tensor(local_scores, dtype=torch.float32)), name
        assert same({**local_info, "server_batch": len(objects)}, remote_info), name


def test_molecules_survive_the_wire_with_their_rdkit_state():
    pytest.importorskip("rdkit")
    from rdkit import Chem

    objects, _, _ = molecules_batch()
    back = decode(encode(objects))
    for a, b in zip(objects, back):
        assert a.smiles == b.smiles and np.array_equal(a.positions, b.positions)
        for m, n in ((a.mol, b.mol), (a.fragment, b.fragment)):
            assert (m is None) == (n is None)
            if m is not None:
                assert Chem.MolToMolBlock(m) == Chem.MolToMolBlock(n)


# ----------------------------------------------------------------------------- batching
def test_concurrent_requests_are_merged_into_one_batch(registered):
    calls = []

    def reward(objects, conditions):
        calls.append((len(objects), conditions.clone()))
        return REWARDS.get("toy-mode")(objects, conditions)

    name = registered("test-counting", reward)
    parts = [toy_batch(4, seed=k) for k in range(4)]
    # the batch closes as soon as the 4 requests' 16 objects are in (max_batch), long before max_wait
    srv = RewardServer(port=0, rewards=[name], max_batch=16, max_wait_ms=20_000).start()
    try:
        remote = RemoteReward(f"{srv.url}/{name}")
        results, barrier = [None] * 4, threading.Barrier(4)

        def client(k):
            barrier.wait()
            results[k] = remote(*parts[k])

        threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        stats = srv.health()
    finally:
        srv.stop()
    assert stats["requests"] == 4 and stats["batches"] == 1 and stats["recent_batches"] == [[name, 4, 16]]
    assert len(calls) == 1 and calls[0][0] == 16
    for (objects, cond), (scores, info) in zip(parts, results):  # each client gets its own rows back
        assert torch.equal(scores, REWARDS.get("toy-mode")(objects, cond)[0]) and info["server_batch"] == 16


def fake_batcher(max_batch, max_wait_s=0.05):
    calls = []

    def fn(objects, conditions):
        calls.append((len(objects), None if conditions is None else tuple(conditions.shape)))
        return torch.arange(len(objects), dtype=torch.float32), {"rows": torch.arange(len(objects)), "count": len(objects)}

    return RewardBatcher("fake", fn, max_batch, max_wait_s, ServerStats()), calls


def submit_all(batcher, requests):
    """Queue the requests before the worker can take any, then wait for all."""
    out = [None] * len(requests)
    threads = [threading.Thread(target=lambda k=k, r=r: out.__setitem__(k, batcher.submit(*r))) for k, r in enumerate(requests)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    batcher.close()
    return out


def test_batches_respect_max_batch_and_condition_shapes():
    batcher, calls = fake_batcher(max_batch=6, max_wait_s=0.5)
    requests = [([0] * 4, torch.zeros(4, 2)), ([0] * 2, torch.zeros(2, 2)), ([0] * 3, torch.zeros(3, 5)),
                ([0] * 8, torch.zeros(8, 2)), ([0] * 1, None)]
    out = submit_all(batcher, requests)
    assert sum(n for n, _ in calls) == 18 and all(n <= 6 or n == 8 for n, _ in calls)  # 8 > max_batch goes alone
    for n, shape in calls:  # never two condition shapes (or None and a tensor) in one call
        assert shape is None or shape[0] == n
    for (objects, _), (scores, info, batch) in zip(requests, out):
        assert len(scores) == len(objects) == len(info["rows"]) and info["count"] == batch  # per-row info split


def test_a_failing_reward_fails_every_request_of_its_batch():
    def fn(objects, conditions):
        raise ValueError("bad molecule")

    batcher = RewardBatcher("broken", fn, 100, 0.2, ServerStats())
    errors = []

    def client():
        try:
            batcher.submit([1, 2], None)
        except ValueError as e:
            errors.append(str(e))

    threads = [threading.Thread(target=client) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    batcher.close()
    assert errors == ["bad molecule"] * 3


# ----------------------------------------------------------------------------- timeouts, retries, failures
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_server_gives_one_line_after_retries_with_backoff():
    pauses = []
    url = f"http://127.0.0.1:{free_port()}/toy-mode?retries=3&backoff=0.5"
    with pytest.raises(FlowcoachError) as e:
        RemoteReward(url, sleep=pauses.append)
    assert pauses == [0.5, 1.0, 2.0]
    message = str(e.value)
    assert "\n" not in message and "unreachable after 4 attempt(s)" in message and "ConnectionRefusedError" in message
    with pytest.raises(FlowcoachError, match="unreachable after 1 attempt"):  # the trainer's spec path, no retry
        build_reward([f"http://127.0.0.1:{free_port()}/toy-mode?retries=0=1.0"])


def test_timeout_then_retry_succeeds_on_a_slow_server(registered):
    finished = threading.Event()
    calls = []

    def slow(objects, conditions):
        calls.append(len(objects))
        if len(calls) == 1:  # the first batch takes longer than the client waits
            time.sleep(1.5)
            finished.set()
        return REWARDS.get("toy-mode")(objects, conditions)

    name = registered("test-slow", slow)
    srv = RewardServer(port=0, rewards=[name], max_wait_ms=0).start()
    pauses = []
    try:
        remote = RemoteReward(f"{srv.url}/{name}?timeout=0.5&retries=2&backoff=0.1",
                              sleep=lambda s: (pauses.append(s), finished.wait(30)))
        objects, cond = toy_batch(8)
        scores, _ = remote(objects, cond)
    finally:
        srv.stop()
    # the first attempt timed out; a retry was answered (a second timeout is possible on a loaded machine)
    assert pauses[:1] == [0.1] and len(calls) == len(pauses) + 1
    assert torch.equal(scores, REWARDS.get("toy-mode")(objects, cond)[0])


class FlakyHandler(_Handler):
    """503 for the first `failures` POSTs, then a real answer."""

    failures = 2
    seen = 0

    def do_POST(self):  # noqa: N802
        type(self).seen += 1
        if type(self).seen <= self.failures:
            self.rfile.read(int(self.headers["Content-Length"]))
            self._error(503, "warming up")
            return
        super().do_POST()


class FlakyServer(RewardServer):
    handler_class = FlakyHandler


def test_5xx_is_retried_and_a_reward_failure_is_not(registered):
    FlakyHandler.seen = 0
    srv = FlakyServer(port=0).start()
    try:
        pauses = []
        remote = RemoteReward(f"{srv.url}/toy-mode?backoff=0.25", sleep=pauses.append)
        objects, cond = toy_batch(4)
        assert torch.equal(remote(objects, cond)[0], REWARDS.get("toy-mode")(objects, cond)[0])
        assert pauses == [0.25, 0.5] and FlakyHandler.seen == 3
        FlakyHandler.seen = 0
        with pytest.raises(FlowcoachError, match=r"unreachable after 2 attempt\(s\) \(last: HTTP 503: warming up\)"):
            RemoteReward(f"{srv.url}/toy-mode?retries=1&backoff=0", sleep=pauses.append)(objects, cond)
    finally:
        srv.stop()

    def broken(objects, conditions):
        raise ZeroDivisionError("no atoms\nsecond line")

    name = registered("test-broken", broken)
    srv = RewardServer(port=0, rewards=[name]).start()
    try:
        pauses = []
        with pytest.raises(RemoteRewardError, match="reward 'test-broken' failed: ZeroDivisionError: no atoms$"):
            RemoteReward(f"{srv.url}/{name}", sleep=pauses.append)(*toy_batch(4))
        assert pauses == [] and srv.health()["requests"] == 1
    finally:
        srv.stop()


# ----------------------------------------------------------------------------- health, routes, token
def get(url, headers=None):
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(urllib.request.Request(url, headers=headers or {}), timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_health_and_routes(server):
    code, health = get(f"{server.url}/health")
    assert code == 200 and health["status"] == "ok" and "toy-mode" in health["rewards"] and health["batches"] == 0
    assert get(f"{server.url}/nowhere")[0] == 404
    assert RemoteReward(f"{server.url}/toy-mode").health()["status"] == "ok"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    for route, body, code, message in [("toy-mode", b"not a payload", 400, "bad request"),
                                       ("no-such-reward", encode({"objects": []}), 404, "unknown reward 'no-such-reward'"),
                                       ("os:system", encode({"objects": []}), 404, "registered names only"),
                                       ("toy-mode", encode({"objects": 3}), 400, "'objects' must be a list")]:
        with pytest.raises(urllib.error.HTTPError) as e:
            opener.open(urllib.request.Request(f"{server.url}/{route}", data=body), timeout=10)
        assert e.value.code == code and message in json.loads(e.value.read())["error"]


def test_a_restricted_server_serves_only_its_rewards():
    with pytest.raises(FlowcoachError, match="unknown reward 'nope'"):
        RewardServer(port=0, rewards=["nope"])
    srv = RewardServer(port=0, rewards=["toy-mode", "flowcoach.rewards.toy:on_manifold_reward"]).start()
    try:
        assert srv.health()["rewards"] == ["flowcoach.rewards.toy:on_manifold_reward", "toy-mode"]
        objects, cond = toy_batch(4)
        scores, _ = RemoteReward(f"{srv.url}/flowcoach.rewards.toy:on_manifold_reward")(objects, cond)
        assert torch.equal(scores, REWARDS.get("toy-on-manifold")(objects, cond)[0])
        with pytest.raises(FlowcoachError, match="does not serve 'toy-on-manifold'; it serves: "):
            RemoteReward(f"{srv.url}/toy-on-manifold")
    finally:
        srv.stop()


def test_token(monkeypatch):
    srv = RewardServer(port=0, token="s3cret").start()
    try:
        assert get(f"{srv.url}/health")[0] == 401
        monkeypatch.delenv("FLOWCOACH_REWARD_TOKEN", raising=False)
        with pytest.raises(FlowcoachError, match="HTTP 401"):
            RemoteReward(f"{srv.url}/toy-mode")
        monkeypatch.setenv("FLOWCOACH_REWARD_TOKEN", "s3cret")
        assert RemoteReward(f"{srv.url}/toy-mode")(*toy_batch(2))[0].shape == (2,)
    finally:
        srv.stop()


def test_serve_rewards_cli_starts_and_answers(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "flowcoach.core.cli", "serve-rewards", "--port", "0",
                             "--rewards", "toy-mode"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=tmp_path)
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving rewards at http://127.0.0.1:"), line + proc.stderr.read()
        url = line.split()[3]
        objects, cond = toy_batch(8)
        assert torch.equal(RemoteReward(f"{url}/toy-mode")(objects, cond)[0], REWARDS.get("toy-mode")(objects, cond)[0])
    finally:
        proc.terminate()
        proc.wait(30)


# ----------------------------------------------------------------------------- training
def test_training_with_a_remote_reward_equals_training_with_the_local_one(tmp_path, server):
    from flowcoach.core.algorithms import algorithm_defaults
    from flowcoach.core.trainer import train

    def run(rewards, out):
        cfg = algorithm_defaults("flow-grpo")
        cfg.output_dir, cfg.rewards = str(tmp_path / out), rewards
        cfg.groups_per_step, cfg.group_size, cfg.steps, cfg.eval_samples = 4, 4, 2, 32
        cfg.tensorboard, cfg.sample_every, cfg.device = False, 0, "cpu"
        run_dir = train(cfg)
        return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]

    local = run(("toy-mode=1.0", "toy-on-manifold=0.5"), "local")
    remote = run((f"{server.url}/toy-mode=1.0", f"{server.url}/toy-on-manifold=0.5"), "remote")
    assert len(remote) == 2 and server.health()["requests"] >= 4  # 2 steps x 2 rewards (+ the final eval)
    for a, b in zip(local, remote):
        assert a["reward/mean"] == b["reward/mean"] and a["policy/loss"] == b["policy/loss"]
        assert a["reward/toy-mode"] == b[f"reward/{server.url}/toy-mode"]
