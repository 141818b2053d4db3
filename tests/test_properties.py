"""Property-based tests (hypothesis): every domain's decoder and every registered reward take random
and degenerate tensors (NaN, inf, huge, zeros, constant, near-data, odd batch and sample sizes)
without crashing: one object per sample, one finite score per object, invalid objects counted.

Deterministic (derandomize, no example database) and small: a fixed number of examples per domain.
Domains whose extras are missing are skipped."""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import flowcoach.rewards  # noqa: F401 - registers the built-in rewards
from flowcoach.core.domain import get_domain
from flowcoach.core.registry import REWARDS

# domain -> (the extras it needs, its rewards' name prefix, examples, sample shapes besides its own)
DOMAINS = {
    "toy": ((), "toy-", 40),
    "molecules": (("rdkit",), "mol-", 25),
    "crystals": (("pymatgen", "smact", "chgnet"), "crystal-", 12),  # CHGNet on the decodable ones
    "speech": (("soundfile", "espeakng_loader"), "speech-", 12),  # Griffin-Lim per sample
    "video": (("cv2",), "video-", 15),
    "grasping": (("mujoco", "gymnasium"), "episode-", 25),
}
SPECIALS = [math.nan, math.inf, -math.inf, 3e38, -3e38]
SCALES = [0.0, 1e-6, 1.0, 30.0, 1e4, 1e30]


def settings_for(examples: int):
    return settings(max_examples=examples, derandomize=True, database=None, deadline=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def test_every_registered_reward_is_exercised_by_a_domain_here():
    prefixes = tuple(prefix for _, prefix, _ in DOMAINS.values())
    def module_of(entry):  # a lazy "module:attr", or the function once resolved
        return entry.split(":")[0] if isinstance(entry, str) else getattr(entry, "__module__", "")

    REWARDS.names()
    builtin = [n for n, entry in REWARDS._entries.items() if module_of(entry).startswith("flowcoach.rewards.")]
    assert builtin and all(n.startswith(prefixes) for n in builtin), [n for n in builtin if not n.startswith(prefixes)]


@lru_cache(maxsize=None)
def domain_of(name: str):
    for module in DOMAINS[name][0]:
        pytest.importorskip(module)
    if name == "molecules":
        from flowcoach.domains.molecules import MoleculesDomain

        return MoleculesDomain(limit=400, fcd=False)
    if name == "video":
        from flowcoach.domains.video import VideoDomain

        return VideoDomain(train_size=16, heldout_size=16)
    if name == "crystals":
        from flowcoach.domains.crystals import CrystalsDomain

        return CrystalsDomain(sevenn=False)
    if name == "speech":
        from flowcoach.domains.speech import SpeechDomain

        return SpeechDomain(classifier=False, recognizer=False)
    return get_domain(name)


@lru_cache(maxsize=None)
def data_rows(name: str) -> torch.Tensor | None:
    """A few real samples of the domain (decodable ones), for near-data cases; None for interact."""
    domain = domain_of(name)
    if domain.kind == "interact":
        return None
    return domain.data("train")[0][:8].float()


@st.composite
def degenerate_batches(draw, name: str):
    """(x [B, ...], description): a base (real data, noise, zeros, a constant) at some scale, with
    some entries replaced by NaN / inf / huge values, at an odd batch size or sample length."""
    domain = domain_of(name)
    shape = list(domain.sample_shape)
    B = draw(st.integers(1, 3))
    if name == "speech":  # fewer frames than the maximum is a valid utterance
        shape[-1] = draw(st.sampled_from([shape[-1], 1, 7]))
    if name == "molecules":  # fewer atom rows than N_MAX is a valid molecule
        shape[0] = draw(st.sampled_from([shape[0], 1, 3]))
    base = draw(st.sampled_from(["data", "noise", "zeros", "constant"]))
    scale = draw(st.sampled_from(SCALES))
    special = draw(st.sampled_from([None, *SPECIALS]))
    fraction = draw(st.sampled_from([0.0, 0.05, 1.0]))
    rows = draw(st.sampled_from(["all", "first"]))  # degenerate entries in every row, or in the first only
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(B, *shape, generator=g)
    real = data_rows(name)
    if base == "data" and real is not None and list(real.shape[1:]) == shape:
        x = real[torch.randint(0, len(real), (B,), generator=g)] + scale * 1e-3 * noise
    elif base == "zeros":
        x = torch.zeros(B, *shape)
    elif base == "constant":
        x = torch.full((B, *shape), float(scale))
    else:
        x = scale * noise
    if special is not None and fraction > 0:
        mask = torch.rand(B, *shape, generator=g) < fraction
        if rows == "first":
            mask[1:] = False
        x = x.masked_fill(mask, special)
    return x, f"B={B} shape={shape} base={base} scale={scale} special={special} fraction={fraction} rows={rows}"


def rewards_of(name: str) -> list[str]:
    return [n for n in REWARDS.names() if n.startswith(DOMAINS[name][1])]


def check_scores(reward: str, scores, info, count: int, case: str) -> None:
    scores = torch.as_tensor(scores)
    assert tuple(scores.shape) == (count,), (reward, case, scores.shape)
    assert torch.isfinite(scores.float()).all(), (reward, case, scores)
    assert isinstance(info, dict), (reward, case)


GENERATE = [n for n in DOMAINS if n != "grasping"]


@pytest.mark.parametrize("name", GENERATE)
def test_decoders_and_rewards_never_crash_on_degenerate_tensors(name):
    domain = domain_of(name)
    rewards = rewards_of(name)
    assert rewards, name
    seen: dict[str, set] = {r: set() for r in rewards}

    @settings_for(DOMAINS[name][2])
    @given(batch=degenerate_batches(name))
    def check(batch):
        x, case = batch
        objects = domain.decode(x.clone())
        assert len(objects) == len(x), case
        cond = domain.train_conditions(len(x), torch.Generator().manual_seed(0))
        for reward in rewards:
            scores, info = REWARDS.get(reward)(objects, cond)
            check_scores(reward, scores, info, len(x), case)
            seen[reward].update(round(float(v), 6) for v in torch.as_tensor(scores).flatten())
            counted = {k: v for k, v in info.items() if "invalid" in k and isinstance(v, (int, float))}
            for k, v in counted.items():
                assert 0 <= v <= len(x), (reward, k, v, case)

    check()
    # the cases reach valid objects too (near-data ones), not only the invalid-object floor
    assert any(len(values) > 1 for values in seen.values()), seen


def test_the_toy_counts_each_non_finite_sample_as_invalid():
    domain = domain_of("toy")
    x = torch.tensor([[0.0, 2.0], [math.nan, 1.0], [math.inf, 0.0], [1e30, -1e30]])
    scores, info = REWARDS.get("toy-mode")(domain.decode(x), torch.zeros(4, dtype=torch.long))
    assert torch.isfinite(scores).all() and info["invalid"] >= 2


@st.composite
def episodes(draw):
    """Episode summaries as core.interact.play_episodes makes them, returns anywhere on the real line."""
    n = draw(st.integers(1, 4))
    out = []
    for _ in range(n):
        steps = draw(st.integers(0, 60))
        success = draw(st.booleans()) and steps > 0
        out.append({"seed": 0, "return": draw(st.floats(-1e30, 1e30, allow_nan=False)), "success": success,
                    "steps": steps, "steps_to_success": draw(st.integers(1, steps)) if success else None})
    return out


def test_grasping_decoder_and_episode_rewards_never_crash():
    domain = domain_of("grasping")
    space_low, space_high = domain._spaces()[1].low, domain._spaces()[1].high

    @settings_for(DOMAINS["grasping"][2])
    @given(batch=degenerate_batches("grasping"), eps=episodes())
    def check(batch, eps):
        x, case = batch
        actions = domain.decode(x.clone())
        assert len(actions) == len(x), case
        for a in actions:  # every action inside the space's bounds, whatever the chunk held
            assert a.shape == tuple(x.shape[1:]) and np.isfinite(a).all(), case
            assert (a >= space_low - 1e-6).all() and (a <= space_high + 1e-6).all(), case
        for reward in rewards_of("grasping"):
            scores, info = REWARDS.get(reward)(eps, None)
            check_scores(reward, scores, info, len(eps), str(eps))

    check()
